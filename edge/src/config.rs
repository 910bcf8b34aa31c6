//! One config struct, read from TOML, overridden by flags, validated up front.
//!
//! Every default is documented on its field with the trade-off it makes. `edge --check-config`
//! validates a file and exits; errors name the key (`fanout.merge_window_ms: ...`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The edge's configuration as the TOML file lays it out, every key with its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// WebSocket listen address. Every shard listens on it with SO_REUSEPORT.
    pub listen: SocketAddr,
    /// Publish API, /healthz, /metrics. Separate port so that the push path is isolated from
    /// publishers; loopback by default because it is an internal API.
    pub http: SocketAddr,
    /// Shard threads, one io_uring each. 0 = one per CPU this process may use.
    pub shards: usize,
    /// Pin shard i to the i-th allowed CPU. Off only helps when sharing a box with other work.
    pub pin: bool,
    /// Conformance mode: every connection echoes what it receives (for the Autobahn suite).
    pub echo: bool,
    /// Start even when another process already listens on `listen` (a rolling restart: the new
    /// edge starts, then the old one drains). Default off: the edge refuses to start and names the
    /// process holding the port, because with SO_REUSEPORT the kernel would otherwise split new
    /// connections between the two silently (`edge --takeover`).
    pub takeover: bool,
    /// Message bus shared by several edges: `bus = "URL"`, or a `[bus]` table with `url` and the
    /// replication settings of [`BusConfig`]. Unset: the embedded single-node bus (no other
    /// service needed).
    pub bus: Option<BusConfig>,
    /// This edge's name in load reports (default: the advertised URL).
    pub edge_id: Option<String>,
    /// The WebSocket URL clients should use to reach this edge, as dispatch hands it out
    /// (default: `ws://<listen>/ws`, with 127.0.0.1 for an unspecified address).
    pub advertise: Option<String>,
    /// Bearer token for `POST /v1/admin/*`. Unset: admin endpoints are refused (403). Never
    /// printed (`Debug` shows `<redacted>`); compared in constant time.
    pub admin_token: Option<Secret>,
    /// `[tls]`: serve `wss://` on `listen` (`cert` and `key`, PEM files; `--tls-cert`,
    /// `--tls-key`; reloaded on SIGHUP). Unset: plain `ws://`.
    pub tls: Option<crate::tls::TlsConfig>,
    /// `[drain]`: how a draining edge sends its clients away.
    pub drain: DrainConfig,
    /// `[dispatch]`: what this edge tells dispatch about its capacity.
    pub dispatch: DispatchConfig,
    /// `[ws]`: the WebSocket listener's bounds, origins and signalling limits.
    pub ws: WsConfig,
    /// `[fanout]`: how rooms' messages are merged into frames.
    pub fanout: FanoutConfig,
    /// `[send]`: per-connection send queues and socket buffers.
    pub send: SendConfig,
    /// `[uring]`: each shard's ring and receive buffers.
    pub uring: UringConfig,
    /// `[engine]`: where the room engines run.
    pub engine: EngineSection,
    /// `[ingest]`: the publish API's threads, keys, body bound and idempotency.
    pub ingest: IngestConfig,
    /// Message kinds and whether each must be delivered. Publishing an unlisted kind is a 400.
    pub kinds: BTreeMap<String, KindConfig>,
    /// `[limits]`: publish rates, room counts and per-address connection bounds.
    pub limits: LimitsConfig,
    /// `[history]`: what rooms keep for recovery and join replays.
    pub history: HistoryConfig,
    /// `[adaptive]`: adaptive merging and sampling of hot rooms.
    pub adaptive: AdaptiveConfig,
    /// `[probes]`: where the kernel figures come from and how often.
    pub probes: ProbesConfig,
    /// `[health]`: the thresholds of the health policy.
    pub health: HealthConfig,
    /// `[auth]`: connection tokens.
    pub auth: AuthConfig,
    /// Where the single-node edge keeps its durable state (rooms' epochs and seqs, must-deliver
    /// history): `--data-dir`. Relative paths are from the working directory. Unused in Redis
    /// mode (Redis, run with AOF, is the authority).
    pub data_dir: PathBuf,
    /// `[store]`: the single-node store's durability and retention.
    pub store: StoreConfig,
    /// `[presence]`: online counts.
    pub presence: PresenceConfig,
    /// `[moderation]`: bans and their bounds.
    pub moderation: ModerationConfig,
}

/// The moderation API (`POST /v1/users/{user}/disconnect`, `/v1/rooms/{room}/bans`,
/// `DELETE /v1/rooms/{room}/messages/{seq}`; docs/PROTOCOL.md, "Moderation"). Who may use it:
/// a publish key with the `moderate` scope, or `admin_token`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModerationConfig {
    /// Bans in force this edge keeps at most (every room together; with Redis, the cluster's,
    /// which every edge mirrors). A ban is about 200 bytes: the default bounds the table at
    /// about 20 MiB. Past it a new ban is refused (507) until bans expire or are lifted: a
    /// moderation tool gone wrong cannot grow the edge without bound.
    pub max_bans: usize,
    /// Longest ban, seconds (default a year). Every ban has an end: a permanent one is a
    /// matter for the application's own user records, not for the push edge.
    pub max_ban_s: u64,
}

impl Default for ModerationConfig {
    fn default() -> Self {
        Self { max_bans: 100_000, max_ban_s: 365 * 86_400 }
    }
}

/// The online count (occupancy) members see and `GET /v1/rooms/{room}` reports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// A room's count goes to its members in a batch at most this often, and only when it
    /// changed (0: never pushed; still in `GET /v1/rooms/{room}`). With a shared bus, each edge
    /// reports its own count to Redis at most this often per room.
    pub interval_ms: u64,
    /// With a shared bus: an edge's count for a room expires in Redis after this long unless
    /// the edge reports it again (it re-reports every third of it), so a crashed edge's members
    /// leave the total within `ttl_ms`.
    pub ttl_ms: u64,
    /// A batch that carries only the count (the room had no message to carry it) is a write
    /// to every member: a room of N members gets one at most every N / this seconds (and never
    /// more often than `interval_ms`). 20,000 keeps rooms up to 2 x 10^4 members at the
    /// interval, shows a 10^5 room its count every 5 s and a 10^6 room every 50 s while it is
    /// silent, at a tenth of what one core writes; a room with traffic shows it every
    /// `interval_ms` in its message batches, at no cost. At 2 x 10^5 members the former
    /// every-second count-only batch took ~10^5 writes a second and cut a ramp's connect rate
    /// from 7,800/s to under 1,000/s (bench-results/2026-11-30-million-README.md).
    pub max_writes_per_s: f64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { interval_ms: 1000, ttl_ms: 15_000, max_writes_per_s: 20_000.0 }
    }
}

/// When a must-deliver message counts as stored: `"always"` (fsync before the publish is
/// acknowledged; one fsync covers every message that arrived meanwhile), an interval in
/// milliseconds (acknowledged once written; fsync at most that often: a process crash loses
/// nothing, a power cut up to the interval), or `"never"` (written, the kernel flushes when it
/// likes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// fsync before acknowledging.
    Always,
    /// Acknowledge once written; fsync at most every this many milliseconds.
    IntervalMs(u64),
    /// Never fsync: the kernel flushes when it likes.
    Never,
}

/// The shared bus (`bus = "URL"`, or `[bus]` with `url` and the settings below).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusConfig {
    /// One Redis, `redis://HOST:PORT`; a Redis Cluster, `redis-cluster://HOST:PORT,HOST:PORT,...`
    /// (a few seed nodes; the rest are discovered: rooms are spread over the primaries by slot,
    /// followed with sharded pub/sub); or one Redis with replicas under Sentinel,
    /// `redis-sentinel://HOST:PORT,HOST:PORT/MASTER` (the sentinels and the master's name: the
    /// edge follows the master they announce). Credentials go in the URL
    /// (`redis://:PASSWORD@HOST:PORT`; for a cluster or the Sentinel's data nodes once, before
    /// the hosts), and are redacted in logs.
    pub url: String,
    /// A must-deliver publish is acknowledged only once at least this many replicas of the
    /// room's primary hold it (Redis `WAIT`), so that a failover cannot lose an acknowledged
    /// gift. Default 0: acknowledged once the primary ran it (replication is asynchronous: a
    /// primary that dies right after may take the last gifts with it). Droppable kinds never
    /// wait. Costs a replication round trip per gift; see ARCHITECTURE.md.
    pub min_replicas_acked: u32,
    /// How long a publish waits for those replicas (default 1000 ms). Fewer within it: the
    /// publisher gets 503 and retries with its Idempotency-Key (the gift is numbered already:
    /// the retry gets the same seq once it is replicated).
    pub replicas_timeout_ms: u64,
}

impl BusConfig {
    /// A bus on `url` with the default replica settings (none waited for).
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), min_replicas_acked: 0, replicas_timeout_ms: 1000 }
    }
}

impl<'de> Deserialize<'de> for BusConfig {
    /// A URL, or a table whose errors name the key (`bus.min_replicas_acked: ...`).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        const KEYS: &str = "url, min_replicas_acked, replicas_timeout_ms";
        let table = match toml::Value::deserialize(d)? {
            toml::Value::String(url) => return Ok(Self::new(url)),
            toml::Value::Table(t) => t,
            _ => return Err(D::Error::custom(format!("bus: expected a URL, or a table with {KEYS}"))),
        };
        if let Some(k) = table.keys().find(|k| !KEYS.split(", ").any(|known| known == k.as_str())) {
            return Err(D::Error::custom(format!("bus.{k}: unknown key (known: {KEYS})")));
        }
        let whole = |key: &str, default: u64| -> Result<u64, D::Error> {
            match table.get(key) {
                None => Ok(default),
                Some(toml::Value::Integer(n)) if *n >= 0 => Ok(n.unsigned_abs()),
                Some(other) => Err(D::Error::custom(format!("bus.{key}: expected a whole number, not {other}"))),
            }
        };
        let url = match table.get("url") {
            Some(toml::Value::String(u)) => u.clone(),
            Some(other) => return Err(D::Error::custom(format!("bus.url: expected a URL string, not {other}"))),
            None => return Err(D::Error::custom("bus.url: missing (the bus's redis URL)")),
        };
        let acked = whole("min_replicas_acked", 0)?;
        let min_replicas_acked = u32::try_from(acked)
            .map_err(|_| D::Error::custom(format!("bus.min_replicas_acked: {acked} is too large")))?;
        Ok(Self { url, min_replicas_acked, replicas_timeout_ms: whole("replicas_timeout_ms", 1000)? })
    }
}

impl<'de> Deserialize<'de> for Fsync {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Ms(u64),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected \"always\", \"never\" or an interval in milliseconds"))?
        {
            Raw::Word(w) if w == "always" => Ok(Self::Always),
            Raw::Word(w) if w == "never" => Ok(Self::Never),
            Raw::Ms(ms) if ms > 0 => Ok(Self::IntervalMs(ms)),
            _ => Err(serde::de::Error::custom("expected \"always\", \"never\" or an interval in milliseconds above 0")),
        }
    }
}

/// `[store]`: whether the single-node edge keeps rooms on disk, how durably, and for how long.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Keep rooms' numbering and must-deliver history on disk (single-node mode). Off: a
    /// restart gives every room a new epoch (clients are told with `reset`).
    pub enabled: bool,
    /// When a must-deliver message counts as stored (see `Fsync`).
    pub fsync: Fsync,
    /// Disk the store may use. At the bound, must-deliver publishes are refused (507, the
    /// publisher retries or alerts) until retention frees space; nothing stored is dropped
    /// early and droppable kinds keep flowing.
    pub max_bytes: u64,
    /// A room untouched this long (no publish, no member) is forgotten on disk too: its
    /// numbering then restarts under a new epoch.
    pub room_ttl_s: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { enabled: true, fsync: Fsync::Always, max_bytes: 1 << 30, room_ttl_s: 7 * 24 * 3600 }
    }
}

/// Serde's messages quote the offending value after "invalid type: KIND" or "invalid value:
/// KIND" (in backticks, or double quotes for strings), up to ", expected ...": that part is
/// cut. Field names (after "unknown field", "missing field") are kept.
fn scrub_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) =
        ["invalid type: ", "invalid value: "].iter().filter_map(|p| rest.find(p).map(|i| (i, p.len()))).min()
    {
        let (at, plen) = i;
        out.push_str(&rest[..at + plen]);
        let tail = &rest[at + plen..];
        // The kind ("integer", "string", ...) is one word; the value follows it.
        let kind_end = tail.find(' ').unwrap_or(tail.len());
        out.push_str(&tail[..kind_end]);
        let after = &tail[kind_end..];
        rest = after.find(", expected").map_or("", |e| &after[e..]);
    }
    out.push_str(rest);
    out
}

impl LimitsConfig {
    /// Rooms joins may create: `max_rooms_by_joins`, or half of `max_rooms`.
    pub fn rooms_by_joins(&self) -> usize {
        self.max_rooms_by_joins.unwrap_or(self.max_rooms / 2).min(self.max_rooms)
    }
}

/// A URL as logs may show it: a password in its user info is replaced (`redis://:pw@h` ->
/// `redis://:<redacted>@h`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let shown = if userinfo.contains(':') { format!("{user}:<redacted>") } else { "<redacted>".into() };
            format!("{scheme}://{shown}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

/// Where the kernel figures (CLOSE_WAIT, Send-Q/Recv-Q, accept queues, retransmits) come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeSource {
    /// eBPF when the kernel takes the programs, else sock_diag (logged once at start).
    Auto,
    /// eBPF only: without it the figures are absent (the edge still starts).
    Ebpf,
    /// netlink sock_diag + /proc/net/netstat only.
    SockDiag,
    /// No kernel probes: health stays `ok`.
    Off,
}

/// `[probes]`: the kernel probes' source and period.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// Where socket figures come from (eBPF, sock_diag, or off); `auto` picks the best available.
    pub source: ProbeSource,
    /// How often the probe thread looks at the kernel (and the health policy runs). A look at
    /// 10^5 sockets costs a few ms of one core (bench-results/*-probes); 1 s keeps that under 1%.
    pub interval_ms: u64,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        Self { source: ProbeSource::Auto, interval_ms: 1000 }
    }
}

/// The health policy (ARCHITECTURE.md, "Health"): each figure has a `degraded` and an
/// `overloaded` threshold; the worst rule wins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Sockets in CLOSE_WAIT: the peer has gone and the edge has not closed. A few are normal for
    /// an instant; thousands mean a shard is not getting round to its closes.
    pub close_wait_degraded: u64,
    /// CLOSE_WAIT sockets at which the edge is overloaded.
    pub close_wait_overloaded: u64,
    /// The 99th percentile of Send-Q over the edge's sockets, bytes: clients falling behind.
    /// The defaults sit at 1/4 and 3/4 of the kernel's buffer for the default
    /// send.socket_send_buffer (16 KiB, doubled by the kernel).
    pub send_queue_p99_degraded_bytes: u64,
    /// Send-Q 99th percentile (bytes) at which the edge is overloaded.
    pub send_queue_p99_overloaded_bytes: u64,
    /// The Send-Q rule applies from this many connected sockets: the 99th percentile of a
    /// handful of sockets is simply the busiest one (a single bulk transfer would flag the edge).
    pub send_queue_min_sockets: u64,
    /// The fullest accept queue as a fraction of its limit: shards not accepting fast enough.
    pub accept_queue_degraded: f64,
    /// Accept-queue fill (0 to 1) at which the edge is overloaded.
    pub accept_queue_overloaded: f64,
    /// Retransmitted segments per second on the edge's sockets: a lossy or congested path.
    pub retransmits_degraded_per_s: f64,
    /// Retransmits per second at which the edge is overloaded.
    pub retransmits_overloaded_per_s: f64,
    /// Consecutive better looks needed before the state improves (it worsens at once), so a
    /// state at a threshold does not flap.
    pub recover_after: u32,
    /// While overloaded, WebSocket handshakes are answered 503 (dispatch also stops sending
    /// clients here as soon as the load report says overloaded).
    pub refuse_when_overloaded: bool,
    /// Overloaded this long (seconds) starts a drain, as `POST /v1/admin/drain` would. 0: never.
    pub drain_after_overloaded_s: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            close_wait_degraded: 256,
            close_wait_overloaded: 4096,
            send_queue_p99_degraded_bytes: 8 * 1024,
            send_queue_p99_overloaded_bytes: 24 * 1024,
            send_queue_min_sockets: 100,
            accept_queue_degraded: 0.5,
            accept_queue_overloaded: 0.9,
            retransmits_degraded_per_s: 200.0,
            retransmits_overloaded_per_s: 2000.0,
            recover_after: 3,
            refuse_when_overloaded: true,
            drain_after_overloaded_s: 0,
        }
    }
}

/// Most shards an edge runs. Nothing in the engine caps it (interest sets are sized to the
/// shard count); each shard is a thread with its own ring, direct-descriptor table and receive
/// buffers (4 MiB by default), so past this a box runs out of memory before it runs out of cores.
pub const MAX_SHARDS: usize = 1024;

/// How far below `ws.idle_timeout_ms` `ws.ping_interval_ms` must be: the sweep that sends a
/// due ping runs every 250 ms, and the pong must be back before the sweep that judges idleness.
pub const PING_MARGIN_MS: u64 = 500;

/// The longest `ws.idle_timeout_ms`: one day (it is also TCP_USER_TIMEOUT, a C int of ms).
pub const MAX_IDLE_TIMEOUT_MS: u64 = 86_400_000;

/// The longest `ws.close_linger_ms`: a closed connection's slot is held at most this long.
pub const MAX_CLOSE_LINGER_MS: u64 = 30_000;

/// One message kind (`[kinds.NAME]`): its delivery class, publishers and conflation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindConfig {
    /// Never sampled, merged away or dropped by any policy; recovered after reconnects.
    pub must_deliver: bool,
    /// Who may publish this kind: `api` (the publish API only), `clients` (over the socket
    /// only) or `both`. Default: `api` for must-deliver kinds (gifts are money: only the back
    /// end, or a user whose token's `pub` claim names the kind, publishes them), `both` for
    /// the others.
    #[serde(default)]
    pub publishers: Option<Publishers>,
    /// Latest state (leaderboards, stream status, pinned notices): only the newest message of
    /// this kind per room (and per `conflate_key` value) is kept. Within a merge window a newer
    /// one replaces the older in the batch, and a joining member is given the newest before
    /// live messages. Not sampled (conflation already bounds it). Droppable kinds only.
    #[serde(default)]
    pub conflate: bool,
    /// A top-level field of the body (a string or a number) whose value tells entries apart:
    /// one latest message per value (e.g. `"slot"` for pinned notices). None: one per room.
    #[serde(default)]
    pub conflate_key: Option<String>,
}

impl KindConfig {
    /// Who may publish the kind: as configured, else by its delivery class.
    pub fn publishers(&self) -> Publishers {
        self.publishers.unwrap_or(if self.must_deliver { Publishers::Api } else { Publishers::Both })
    }
}

/// Who may publish a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Publishers {
    /// The publish API only.
    Api,
    /// Clients over their socket only.
    Clients,
    /// Both the publish API and clients.
    Both,
}

impl Publishers {
    /// Whether clients may publish the kind over their socket.
    pub fn clients(self) -> bool {
        matches!(self, Self::Clients | Self::Both)
    }

    /// Whether the publish API may publish the kind.
    pub fn api(self) -> bool {
        matches!(self, Self::Api | Self::Both)
    }
}

/// Connection tokens (see `auth.rs` and the README's "Security"). No key configured (and no
/// `ROOMCAST_AUTH_SECRET` in the environment): anonymous mode, every connection gets a
/// server-made id and may publish only the kinds configured for clients. A key configured: a
/// connection without a valid token is refused (401).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 shared secret (at least 32 bytes). Prefer the environment: `ROOMCAST_AUTH_SECRET`.
    pub hs256_secret: Option<Secret>,
    /// Public keys for RS256/ES256 tokens; several for rotation, picked by the token's `kid`.
    pub keys: Vec<PublicKeyConfig>,
    /// Required `iss` claim, if set.
    pub issuer: Option<String>,
    /// Required `aud` claim, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`, seconds (default 5).
    pub leeway_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { hs256_secret: None, keys: Vec::new(), issuer: None, audience: None, leeway_s: 5 }
    }
}

/// One public key for RS256/ES256 tokens (`[[auth.keys]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyConfig {
    /// Matched against the token header's `kid` (absent: tried for every token of its alg).
    pub kid: Option<String>,
    /// The algorithm tokens signed with this key use.
    pub alg: KeyAlg,
    /// PEM file with the public key.
    pub file: String,
}

/// The signature algorithms accepted for public keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KeyAlg {
    /// RSA PKCS#1 v1.5 with SHA-256.
    #[serde(rename = "RS256")]
    Rs256,
    /// ECDSA P-256 with SHA-256.
    #[serde(rename = "ES256")]
    Es256,
}

/// `[limits]`: rate limits on publishing and bounds on rooms and per-address connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Droppable messages per second per room (token bucket); over it: 429, counted as dropped.
    pub room_rate: f64,
    /// Burst of the per-room droppable bucket.
    pub room_burst: f64,
    /// Droppable messages per second per user, across rooms.
    pub user_rate: f64,
    /// Burst of the per-user droppable bucket.
    pub user_burst: f64,
    /// Must-deliver messages per second per room: a separate, higher limit that rejects (429,
    /// the publisher retries) and never silently drops.
    pub must_deliver_room_rate: f64,
    /// Burst of the per-room must-deliver bucket.
    pub must_deliver_room_burst: f64,
    /// Rooms this edge keeps at most (split evenly over its engines), whether they were
    /// created by a publish or by a client's join: beyond it, publishes get 503 and joins an
    /// `error` (`join_refused`). A room costs about 1 KiB plus its history.
    pub max_rooms: usize,
    /// A join may create a room only while the edge holds fewer rooms than this (the rest of
    /// `max_rooms` is kept for the publish API, so a join flood cannot lock the back end out);
    /// default half of `max_rooms`. A room nobody published to is forgotten as soon as its last member leaves.
    pub max_rooms_by_joins: Option<usize>,
    /// Connections one client address may hold open (0: no cap). IPv6 counts by /64.
    pub per_ip_connections: u32,
    /// New connections per second one address may open (token bucket; 0: no limit). Over
    /// either bound the connection gets a 429 and is closed at once, before its request is read.
    pub per_ip_connect_rate: f64,
    /// Burst of the per-address connect bucket.
    pub per_ip_connect_burst: f64,
    /// Networks the per-address bounds skip. Loopback by default: behind a TLS terminator on
    /// the same host every client would look like 127.0.0.1.
    pub ip_exempt: Vec<ipnet::IpNet>,
}

/// `[history]`: what each room keeps for `since` recovery and join replays.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Must-deliver messages kept per room for `since` recovery. With a Redis bus this is the
    /// fleet's, not this edge's alone: a room's must-deliver stream in Redis is shared, and
    /// each publish trims it to the value of the edge that took the publish, so the smallest
    /// value in the fleet is what recovery can count on. Give every edge the same; an edge
    /// warns at connect when the last edge to connect before it had another.
    pub must_deliver: usize,
    /// Droppable messages kept per room. They serve only the last-`join_last` replay on join,
    /// so no more than `join_last` are kept (none by default). With a Redis bus, shared like
    /// `must_deliver`: each publish trims the room's droppable stream to this (approximately).
    pub droppable: usize,
    /// Bytes of must-deliver (droppable) history per room: the oldest go first (an evicted
    /// must-deliver seq is a `gap` to a `since` below it).
    pub must_deliver_bytes: usize,
    /// Bytes of droppable history per room (see `must_deliver_bytes`).
    pub droppable_bytes: usize,
    /// Bytes of droppable history the whole edge keeps: beyond, new droppable messages are
    /// delivered but not kept (rooms times `droppable_bytes` could otherwise be anything).
    pub max_droppable_bytes: usize,
    /// Nothing older than this is kept.
    pub max_age_ms: u64,
    /// Messages replayed to a join without `since`.
    pub join_last: usize,
    /// A room with no member, nothing pending and nothing left in history leaves memory after
    /// this long without activity. With the store it stays on disk (its numbering continues
    /// when it comes back); without, it is forgotten (a new epoch next time).
    pub room_idle_ms: u64,
}

/// `[adaptive]`: how hot rooms' windows widen and their droppable messages are sampled under load.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    /// Widen hot rooms' merge windows when shards fall behind.
    pub enabled: bool,
    /// Widest window (the bound that keeps gift latency well inside the 10 s promise).
    pub max_window_ms: u64,
    /// A shard whose queued bytes exceed this is behind (widen) ...
    pub high_water_bytes: usize,
    /// ... and below this it has caught up (narrow).
    pub low_water_bytes: usize,
    /// Droppable messages per second a room shows once sampling is on ...
    pub visible_rate: f64,
    /// ... lowered for rooms so large that even that exceeds `room_deliveries_per_s` (a room
    /// of N members shows room_deliveries_per_s / N), but never below this.
    pub min_visible_rate: f64,
    /// A room whose offered messages per second times its members exceeds this is sampled to
    /// `visible_rate` at once, without waiting for shards to fall behind (off again below half).
    /// Backlog-driven sampling reacts only after the socket buffers, which shedding cannot
    /// reach, are already full of chat that gifts must queue behind. 500,000 deliveries/s is
    /// about a fifth of what one core delivers merged (bench-results/2026-11-24-fanout).
    /// It is where sampling starts, not a ceiling: while gifts are well inside
    /// `gift_latency_target_ms` the latency controller lets sampled rooms show up to 10 times
    /// this / members (never over `visible_rate`), and cuts it when gifts run late on busy shards.
    pub room_deliveries_per_s: f64,
    /// Until the shards have measured their capacity (the first seconds after start, and while
    /// they are lightly loaded), a hot room's merge window is at least members / this, seconds
    /// (up to `max_window_ms`), so its fan-out costs at most this many writes a second: 100,000
    /// is half of what one core writes (5 µs each, bench-results/2026-11-24-fanout). A room of
    /// 10^4 keeps the 100 ms base; one of 10^5 merges over 1 s. Once measured, the window from
    /// the measured capacity is used up to this rule's (a faster machine gets narrower windows;
    /// wider ones come from the backlog rule, see engine/adaptive.rs).
    pub room_frames_per_s: f64,
    /// The latency the controller steers gifts to (p99, from a message's arrival at its room's
    /// batch to the completion of its write to a member, so the merge window counts; measured
    /// by the shards). Between max(200, 2 x fanout.merge_window_ms) and 9,000. Over it, hot rooms merge over longer
    /// windows and chat is sampled harder; well under it (below half), they relax again.
    pub gift_latency_target_ms: u64,
}

/// `[drain]`: how a draining edge sends its clients away: pace, deadline, dispatch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// `goaway` messages are spread uniformly over this period, so reconnects do not stampede
    /// the other edges or dispatch.
    pub period_ms: u64,
    /// The drain ends (the rest are closed with 1001) when connections fall to this ...
    pub threshold: u64,
    /// ... or when this much time has passed since it began.
    pub deadline_ms: u64,
    /// Where `goaway` sends clients (a dispatch endpoint); default: this edge's `/v1/route`,
    /// which answers with another edge once this one is draining.
    pub dispatch_url: Option<String>,
    /// With a bus: hold the goaways not sent yet while no other edge takes members, or while
    /// more than `max_moving` are on their way (sent away, not yet on another edge), within
    /// the slack between `period_ms` and `deadline_ms` (`edge/src/drain.rs`).
    pub pace: bool,
    /// Most members on their way before goaways wait; 0: what the other edges took in the
    /// last 30 s, and at least what `period_ms` sends in 5 s (at least 1,000).
    pub max_moving: u64,
}

/// The longest `drain.deadline_ms` (and so `drain.period_ms`): a day.
pub const DRAIN_MAX_MS: u64 = 24 * 60 * 60 * 1000;

impl Default for DrainConfig {
    fn default() -> Self {
        Self { period_ms: 10_000, threshold: 0, deadline_ms: 30_000, dispatch_url: None, pace: true, max_moving: 0 }
    }
}

/// `[dispatch]`: what this edge reports to dispatch besides what it measures (connections
/// against its descriptor tables, frames a second against its shards' measured capacity).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// The bytes a second this edge's link carries out (a 10 Gbit/s NIC: 1250000000): dispatch
    /// then weighs the bytes the edge writes against it. 0 (default): bandwidth is reported,
    /// not weighed (nothing on the box says what share of a shared link is this edge's).
    pub egress_bytes_per_s: f64,
}

/// `[ws]`: the WebSocket listener's bounds, timeouts, origins and signalling limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// Largest message a client may send (bytes). Clients send signalling and chat, not media:
    /// 64 KiB bounds memory per connection while fitting any real message.
    pub max_message: usize,
    /// A connection that has not completed its upgrade within this time is closed.
    pub handshake_timeout_ms: u64,
    /// The server pings each open connection this often, unless it took one of the room's
    /// message frames within the interval (the room's traffic is its heartbeat); 0 disables
    /// pings. SSE streams get a heartbeat comment (`:`) likewise, which keeps proxies and NAT
    /// tables from timing them out.
    pub ping_interval_ms: u64,
    /// A connection that has sent nothing (not even a pong) and taken no message frame for this
    /// long is closed (1001). Also the listeners' TCP_USER_TIMEOUT: the kernel fails a
    /// connection whose written bytes stay unacknowledged this long. Not for SSE streams, whose
    /// clients never send: a dead one shows as a failed write.
    pub idle_timeout_ms: u64,
    /// Connections per shard; 0 = as many as the kernel allows (RLIMIT_NOFILE caps each ring's
    /// direct-descriptor table: 20000 here, so 10^5 connections need 6 shards); else at least
    /// [`MIN_CONNECTIONS_PER_SHARD`]. A connection that finds its shard's table full is closed
    /// by the kernel at once (`connections_closed_total{reason="table_full"}`).
    pub max_connections_per_shard: u32,
    /// Listen backlog per shard (each shard has its own listener on the port), and of the HTTP
    /// API's listener (clients of a reconnect storm ask `/v1/route` first; it was 128). The kernel caps
    /// it at `net.core.somaxconn` without a word (4096 by default): the edge warns at start
    /// (and `--check-config` prints the same warning) when this is above it. A reconnect storm of 10^6 members overflowed 61 queues of 4096
    /// (bench-results/2026-12-01-restart-storm-README.md).
    pub backlog: i32,
    /// Signalling messages (join, switch, leave, publish) a connection may send per second,
    /// and its burst. Over it, the message is refused with an `error` (`rate_limited`) and
    /// counted: one client cannot keep an engine busy with joins; one that sends more than a burst
    /// of refused messages in a row is closed with 1008. Default 20/s, burst 40: a
    /// person switches rooms and chats far slower; a bot that needs more gets its own limits.
    pub signal_rate: f64,
    /// Burst of the per-connection signalling bucket.
    pub signal_burst: f64,
    /// Origins browsers may connect from (RFC 6455 §10.2): exact (`https://example.com`) or a
    /// wildcard subdomain (`https://*.example.com`). Empty (default): any. A request whose
    /// `Origin` is not listed gets 403; one without `Origin` (not a browser: Origin protects
    /// only against pages in browsers) is let through to token checks. `GET /sse` applies the
    /// same list and answers CORS for it (`Access-Control-Allow-Origin`: the origin, or `*` when
    /// the list is empty).
    pub allowed_origins: Vec<String>,
    /// permessage-deflate (RFC 7692): accept a client's offer (browsers make one by default).
    /// The edge answers with `server_no_context_takeover`, so each room batch is compressed once
    /// per window size and the same compressed frame goes to every member that negotiated it
    /// (serialize-once holds); members without it get the plain frame. Live-room JSON shrinks
    /// 3 to 10 times (bench-results/2026-11-30-deflate.md). Costs: one compression per batch
    /// per window size in use, and inflating what clients send compressed. Default true;
    /// `--permessage-deflate false` turns it off.
    pub permessage_deflate: bool,
    /// Let a client that does not offer `client_no_context_takeover` keep its compression
    /// context between the messages it sends. Off (default): the answer always carries
    /// `client_no_context_takeover` (RFC 7692 §7.1.1.2 lets a server ask it), so a client's
    /// messages are inflated by one inflater per shard and no inflate state lives per
    /// connection. On: a connection that sends compressed messages holds an inflater of about
    /// 40 KiB (a 32 KiB window) for its life, 4 GB for 10^5 such connections, for little: clients
    /// send short signalling and chat.
    pub deflate_client_context: bool,
    /// Lingering close: after the edge's last bytes of a connection (its close frame, an HTTP
    /// error, the end of an event stream; over TLS then its close_notify) it shuts its write
    /// side (FIN) and reads and discards what the peer still sends, until the peer's FIN, this
    /// long, or 64 KiB, whichever comes first; then it closes. Linux answers a close with bytes
    /// unread, and bytes that arrive after it, with a reset, which can destroy the close frame
    /// before the client reads it: a client's close_notify after its close frame, and a
    /// client's close frame answering the edge's, were reset. A peer that has nothing more to
    /// say closes at once (an RTT); this bounds one that does not: its slot is held this long
    /// (a drain's or shutdown's wait included). Default 2000, as Apache's lingering close;
    /// 0 turns lingering off (close once the last bytes are written); at most 30000.
    pub close_linger_ms: u64,
}

/// `[fanout]`: the merge window and the bounds of one merged frame.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FanoutConfig {
    /// Merge window: a room's messages arriving within it go out as one frame.
    /// 100 ms: a UI renders tens of updates per second at most, so 10 frames/s per member loses
    /// nothing visible; it adds at most 100 ms to a gift's latency (the promise is 10 s); and it
    /// caps the kernel's cost at 10 writes/s per member, whatever the message rate.
    /// 0 = no merging: every message is flushed at the end of its engine's turn (messages that
    /// are already queued together still share a frame).
    pub merge_window_ms: u64,
    /// A batch is flushed early when it holds this many messages ...
    pub max_batch_messages: usize,
    /// ... or this many bytes of bodies.
    pub max_batch_bytes: usize,
}

/// `[send]`: per-connection send queue bounds and socket buffers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SendConfig {
    /// Bytes queued for one connection before it counts as a slow consumer and is closed with
    /// 4000 (it reconnects with `since`). Bounds memory per connection whatever the client does.
    pub max_queue_bytes: usize,
    /// Frames queued for one connection, same rule.
    pub max_queue_frames: usize,
    /// A connection whose oldest unsent frame has waited this long is behind: its queued
    /// droppable content is shed (must-deliver messages stay). Keeps gifts from queueing behind
    /// seconds of chat for a reader that cannot keep up.
    pub max_queue_delay_ms: u64,
    /// SO_SNDBUF of every connection (set on the listeners, inherited; the kernel doubles it).
    /// A small, fixed kernel buffer keeps backpressure in user space, where policy applies
    /// (droppable content is shed, gifts are kept): whatever sits in the kernel buffer is sent
    /// in order, so a gift waits behind all of it. 16 KiB (32 KiB in the kernel) is ~4 s of a
    /// sampled room's stream for a reader taking 8 KB/s, and still 320 KB/s per connection at
    /// a 100 ms round trip. 0 = kernel autotuning (megabytes of chat no policy can take back).
    pub socket_send_buffer: usize,
    /// TCP_NOTSENT_LOWAT of every connection (set on the listeners, inherited): the kernel takes
    /// more bytes from a send only while fewer than this many are still unsent, so unsent
    /// bytes stay in user space (where policy applies) without capping the bytes in flight the
    /// way a small SO_SNDBUF does on a long round trip. 16 KiB: a slow reader's gift p99 5.4 s,
    /// max 5.8 s, against 7.6 / 8.7 s without it; 4 KiB does a little better for slow readers
    /// but splits writes so finely that a saturated edge pays 2.6x the CPU per delivery
    /// (16 KiB: 1.8x) (bench-results/2026-11-30-sndbuf-README.md). 0 = not set.
    pub socket_notsent_lowat: usize,
    /// Frames gathered into one writev when a connection has several queued.
    pub max_iov: usize,
    /// A join's `since` replay may exceed `max_queue_bytes` (a reader catching up on many
    /// gifts must not be closed as slow for it): its bytes are credit on top of the bound until
    /// written. This many replay bytes may wait unsent per shard, all connections together;
    /// a join whose replay would go past it is closed with 1013 (try again later: it reconnects
    /// with the same `since` and loses nothing).
    pub max_replay_bytes: usize,
}

/// Where the room engines run (ARCHITECTURE.md, "Room engines": both were measured).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Engine i runs inside shard thread i (the default): a room whose members are all on the
    /// engine's own shard costs no cross-thread message at all, and a loop turn ships one mail
    /// per peer.
    Shard,
    /// Engine i runs on a thread of its own, pinned to the same CPU as shard i: every join and
    /// every delivery crosses a thread, and the two threads of a core compete for it.
    Beside,
}

/// `[engine]`: whether room engines run on the shards' threads or beside them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// `shard` (default) or `beside`.
    pub placement: Placement,
}

impl Default for EngineSection {
    fn default() -> Self {
        Self { placement: Placement::Shard }
    }
}

/// `[uring]`: the size of each shard's ring and receive-buffer pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UringConfig {
    /// Submission queue entries per shard (the completion queue is 16x, at most 65,536).
    pub sq_entries: u32,
    /// Receive buffers per shard (power of two), shared by all its connections.
    pub recv_buffers: u16,
    /// Size of one receive buffer.
    pub recv_buffer_size: usize,
}

/// `[ingest]`: the publish API's threads, keys, body bound and idempotency keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest publish request body (413 above).
    pub max_body_bytes: usize,
    /// Most messages in one `POST /v1/messages` batch (400 above).
    pub max_batch: usize,
    /// Largest `POST /v1/messages` body (413 above), and never less than `max_body_bytes` (a
    /// batch can always hold one message); each message in it is held to `max_body_bytes`.
    pub max_batch_bytes: usize,
    /// Threads of the HTTP runtime (publish API, metrics). Never the shards' CPUs' work.
    pub threads: usize,
    /// Publish API keys (`[[ingest.keys]]`), added to those in the environment variable
    /// `ROOMCAST_API_KEYS` (`name1:key1,name2:key2`, unrestricted). With any key,
    /// `POST /v1/rooms/{room}/messages` needs `Authorization: Bearer KEY` (401 without or with
    /// an unknown key, 403 outside the key's rooms or kinds). With none, the publish API is open:
    /// allowed only when `http` is a loopback address (only local processes can reach it) or
    /// with `insecure_no_keys`; otherwise the edge refuses to start. The GET endpoints stay open.
    pub keys: Vec<ApiKeyConfig>,
    /// Serve an open publish API (no key) on a non-loopback `http` address: for a network where
    /// something in front already authenticates publishers. Logged at WARN at start-up.
    pub insecure_no_keys: bool,
    /// A publish with an `Idempotency-Key` header already used in the room within this many
    /// seconds gets the first answer (its seq, `"replayed": true`) and publishes nothing.
    pub idempotency_ttl_s: u64,
    /// At most this many keys remembered per room (the oldest go first).
    pub idempotency_keys: usize,
}

/// One publish API key (`[[ingest.keys]]`). Checked by `crate::ingest::PublishKeys`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds the key: 1 to 64 bytes of `A-Z a-z 0-9 _ . -`, unique. Refusals and logs name
    /// it, never the key.
    pub name: String,
    /// The key itself: at least 16 printable ASCII characters, no spaces. Exactly one of `key`
    /// and `key_env`.
    pub key: Option<Secret>,
    /// The name of an environment variable holding the key (keeps it out of the file).
    pub key_env: Option<String>,
    /// Rooms it may publish to: exact names, or prefixes ending in `*` (`"match-*"`; `"*"` is
    /// every room). Unset: every room.
    pub rooms: Option<Vec<String>>,
    /// Kinds it may publish (each a configured kind). Unset: every kind.
    pub kinds: Option<Vec<String>>,
    /// What the key may do: `publish` (the publish API) and/or `moderate` (the moderation API:
    /// disconnect users, ban them from rooms, delete messages; within `rooms`, and only a key
    /// with no `rooms` may disconnect a user, which reaches every room). Unset: `["publish"]`.
    pub scopes: Option<Vec<String>>,
}

/// A credential from the config (an API key, the admin token). `Debug` prints `<redacted>`, so
/// neither `{:?}` of the config nor a log line shows it; read it with `expose`. No `PartialEq`:
/// compare in constant time (`crate::ingest::ct_eq`).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret read from the environment or a file.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret's text, for the one place that must compare or send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("literal"),
            http: "127.0.0.1:8081".parse().expect("literal"),
            shards: 0,
            pin: true,
            echo: false,
            takeover: false,
            bus: None,
            edge_id: None,
            advertise: None,
            tls: None,
            admin_token: None,
            drain: DrainConfig::default(),
            dispatch: DispatchConfig::default(),
            ws: WsConfig::default(),
            fanout: FanoutConfig::default(),
            send: SendConfig::default(),
            uring: UringConfig::default(),
            engine: EngineSection::default(),
            ingest: IngestConfig::default(),
            kinds: default_kinds(),
            limits: LimitsConfig::default(),
            history: HistoryConfig::default(),
            adaptive: AdaptiveConfig::default(),
            probes: ProbesConfig::default(),
            health: HealthConfig::default(),
            auth: AuthConfig::default(),
            data_dir: PathBuf::from("roomcast-data"),
            store: StoreConfig::default(),
            presence: PresenceConfig::default(),
            moderation: ModerationConfig::default(),
        }
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            max_message: 64 * 1024,
            handshake_timeout_ms: 10_000,
            ping_interval_ms: 30_000,
            idle_timeout_ms: 90_000,
            max_connections_per_shard: 0,
            backlog: 4096,
            signal_rate: 20.0,
            signal_burst: 40.0,
            allowed_origins: Vec::new(),
            permessage_deflate: true,
            deflate_client_context: false,
            close_linger_ms: 2_000,
        }
    }
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self { merge_window_ms: 100, max_batch_messages: 256, max_batch_bytes: 64 * 1024 }
    }
}

impl Default for SendConfig {
    fn default() -> Self {
        Self {
            max_queue_bytes: 1024 * 1024,
            max_queue_frames: 1024,
            max_queue_delay_ms: 1000,
            socket_send_buffer: 16 * 1024,
            socket_notsent_lowat: 16 * 1024,
            max_iov: 16,
            max_replay_bytes: 256 << 20,
        }
    }
}

impl Default for UringConfig {
    fn default() -> Self {
        Self { sq_entries: 4096, recv_buffers: 1024, recv_buffer_size: 4096 }
    }
}

fn default_kinds() -> BTreeMap<String, KindConfig> {
    [("gift", true), ("chat", false), ("system", true), ("like", false)]
        .into_iter()
        .map(|(k, must_deliver)| {
            (k.to_owned(), KindConfig { must_deliver, publishers: None, conflate: false, conflate_key: None })
        })
        .collect()
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            room_rate: 2000.0,
            room_burst: 4000.0,
            user_rate: 10.0,
            user_burst: 20.0,
            must_deliver_room_rate: 5000.0,
            must_deliver_room_burst: 10000.0,
            max_rooms: 1_000_000,
            max_rooms_by_joins: None,
            per_ip_connections: 2000,
            per_ip_connect_rate: 50.0,
            per_ip_connect_burst: 500.0,
            ip_exempt: ["127.0.0.0/8", "::1/128"].iter().filter_map(|n| n.parse().ok()).collect(),
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            must_deliver: 10_000,
            droppable: 200,
            max_age_ms: 600_000,
            join_last: 0,
            room_idle_ms: 600_000,
            must_deliver_bytes: 64 << 20,
            droppable_bytes: 256 << 10,
            max_droppable_bytes: 256 << 20,
        }
    }
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_window_ms: 2000,
            high_water_bytes: 64 * 1024 * 1024,
            low_water_bytes: 8 * 1024 * 1024,
            visible_rate: 50.0,
            min_visible_rate: 5.0,
            room_deliveries_per_s: 500_000.0,
            room_frames_per_s: 100_000.0,
            gift_latency_target_ms: 2000,
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_batch: 1000,
            max_batch_bytes: 1024 * 1024,
            threads: 1,
            keys: Vec::new(),
            insecure_no_keys: false,
            idempotency_ttl_s: 600,
            idempotency_keys: 100_000,
        }
    }
}

/// A config that cannot be used, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file named.
        path: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file named.
        path: String,
        /// The TOML parser's complaint.
        message: String,
    },
    /// A value is out of range or contradicts another.
    #[error("{key}: {message}")]
    Invalid {
        /// The key at fault (`section.key`).
        key: &'static str,
        /// What is wrong, and what is allowed.
        message: String,
    },
}

/// The smallest `ws.max_connections_per_shard` other than 0: the table's size, of which the
/// shard keeps 16 descriptors for itself.
pub const MIN_CONNECTIONS_PER_SHARD: u32 = 32;

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

impl Config {
    /// Reads a TOML file. Unknown keys are errors (a typo must not silently fall back).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.display().to_string(), message },
            other => other,
        })
    }

    /// Parses TOML. A parse error names the line and the problem but never quotes the line,
    /// nor a value: the line may hold a secret (an API key, the token secret, a password in the
    /// bus URL), however the key is spelled (quoted, dotted, in an inline table), and errors end
    /// up in logs. Serde's "invalid type/value" messages quote the value: that part is cut.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        const SECRET_WORDS: [&str; 5] = ["key", "secret", "token", "password", "bus"];
        toml::from_str(text).map_err(|e| {
            let message = scrub_values(e.message());
            let Some(span) = e.span() else {
                return ConfigError::Parse { path: String::from("<config>"), message };
            };
            let start = span.start.min(text.len());
            let line_no = text[..start].matches('\n').count() + 1;
            let line = text[..start].rsplit('\n').next().unwrap_or("").to_owned()
                + text[start..].split('\n').next().unwrap_or("");
            let key = line.split_once('=').map(|(k, _)| k.trim().trim_matches(['"', '\'']).to_owned());
            let lower = line.to_ascii_lowercase();
            let message = match key {
                // The line may carry a credential: say only where, and what key.
                Some(k) if SECRET_WORDS.iter().any(|w| lower.contains(w)) => {
                    format!("line {line_no} ({k}): invalid value (not shown: it may be a secret)")
                }
                Some(k) => format!("line {line_no} ({k}): {message}"),
                None => format!("line {line_no}: {message}"),
            };
            ConfigError::Parse { path: String::from("<config>"), message }
        })
    }

    /// Checks every value; the first problem is returned, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards > MAX_SHARDS {
            return Err(invalid("shards", "at most 1024 (each shard is a thread, a ring and its receive buffers)"));
        }
        if self.limits.max_rooms == 0 {
            return Err(invalid("limits.max_rooms", "must be above 0"));
        }
        if self.store.max_bytes < 256 << 20 {
            return Err(invalid(
                "store.max_bytes",
                "at least 268435456 (256 MiB: the store's journal alone preallocates 64 MiB)",
            ));
        }
        if self.store.enabled && self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must name a directory (or run with --no-store)"));
        }
        if let Fsync::IntervalMs(ms) = self.store.fsync
            && ms > 60_000
        {
            return Err(invalid("store.fsync", "an interval of at most 60000 ms (or \"always\", \"never\")"));
        }
        if self.store.room_ttl_s < 60 || self.store.room_ttl_s * 1000 <= self.history.max_age_ms {
            return Err(invalid("store.room_ttl_s", "at least 60, and longer than history.max_age_ms"));
        }
        if self.history.max_age_ms == 0 {
            return Err(invalid("history.max_age_ms", "must be above 0"));
        }
        if self.presence.ttl_ms < 3_000 || self.presence.ttl_ms > 3_600_000 {
            return Err(invalid("presence.ttl_ms", "must be between 3000 and 3600000"));
        }
        if !(self.dispatch.egress_bytes_per_s.is_finite() && self.dispatch.egress_bytes_per_s >= 0.0) {
            return Err(invalid("dispatch.egress_bytes_per_s", "must be a finite number, 0 or more"));
        }
        if self.presence.interval_ms > 0 && self.presence.interval_ms < 100 {
            return Err(invalid("presence.interval_ms", "must be 0 (off) or at least 100"));
        }
        if !(self.presence.max_writes_per_s.is_finite() && self.presence.max_writes_per_s >= 1.0) {
            return Err(invalid("presence.max_writes_per_s", "must be a finite number of at least 1"));
        }
        if self.history.room_idle_ms == 0 {
            return Err(invalid("history.room_idle_ms", "must be above 0"));
        }
        for (name, k) in &self.kinds {
            if k.conflate && k.must_deliver {
                return Err(invalid(
                    "kinds",
                    format!("kinds.{name}.conflate: must-deliver kinds are never conflated (every one is delivered)"),
                ));
            }
            if k.conflate_key.is_some() && !k.conflate {
                return Err(invalid("kinds", format!("kinds.{name}.conflate_key: needs conflate = true")));
            }
            if k.conflate_key.as_ref().is_some_and(|f| f.is_empty() || f.len() > 64) {
                return Err(invalid("kinds", format!("kinds.{name}.conflate_key: a body field name of 1 to 64 bytes")));
            }
        }
        if self.limits.max_rooms_by_joins.is_some_and(|j| j > self.limits.max_rooms) {
            return Err(invalid("limits.max_rooms_by_joins", "at most limits.max_rooms"));
        }
        if !(self.limits.per_ip_connect_rate >= 0.0 && self.limits.per_ip_connect_rate.is_finite()) {
            return Err(invalid("limits.per_ip_connect_rate", "must be a finite number >= 0 (0: no limit)"));
        }
        if !(self.limits.per_ip_connect_burst >= 1.0 && self.limits.per_ip_connect_burst.is_finite()) {
            return Err(invalid("limits.per_ip_connect_burst", "must be a finite number >= 1"));
        }
        for o in &self.ws.allowed_origins {
            let rest = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://"));
            // scheme://host[:port], or scheme://*.domain[:port] with a real domain after "*.".
            let host = rest.map(|r| r.strip_prefix("*.").unwrap_or(r));
            if host.is_none_or(|h| crate::auth::host_port(h).is_none()) {
                return Err(invalid(
                    "ws.allowed_origins",
                    "each is scheme://host[:port], optionally scheme://*.domain (no path)",
                ));
            }
        }
        if self.auth.hs256_secret.as_ref().is_some_and(|s| s.expose().len() < 32) {
            return Err(invalid("auth.hs256_secret", "at least 32 bytes"));
        }
        // Set but empty or short is an error, never "auth off": a secret store that failed to
        // load must not open the edge.
        if let Ok(env) = std::env::var("ROOMCAST_AUTH_SECRET")
            && env.len() < 32
        {
            return Err(invalid("ROOMCAST_AUTH_SECRET", "set, so at least 32 bytes (unset it to run without tokens)"));
        }
        if !(self.ws.signal_rate > 0.0 && self.ws.signal_burst >= 1.0) {
            return Err(invalid("ws.signal_rate", "must be above 0, with ws.signal_burst at least 1"));
        }
        let ws = &self.ws;
        if ws.max_message < 125 || ws.max_message > 64 * 1024 * 1024 {
            return Err(invalid("ws.max_message", "must be between 125 and 67108864 bytes"));
        }
        if ws.handshake_timeout_ms == 0 {
            return Err(invalid("ws.handshake_timeout_ms", "must be above 0"));
        }
        if ws.idle_timeout_ms == 0 {
            return Err(invalid("ws.idle_timeout_ms", "must be above 0"));
        }
        if ws.idle_timeout_ms > MAX_IDLE_TIMEOUT_MS {
            // It is also the listeners' TCP_USER_TIMEOUT, a C int of milliseconds: 2^31 or more
            // failed the edge's start with "Invalid argument" after the check had passed.
            return Err(invalid("ws.idle_timeout_ms", format!("at most {MAX_IDLE_TIMEOUT_MS} (one day)")));
        }
        if ws.ping_interval_ms != 0 && ws.ping_interval_ms + PING_MARGIN_MS > ws.idle_timeout_ms {
            // A ping goes out on the shards' 250 ms sweep after it is due, and its pong needs
            // time to come back before the idle timeout is judged on the same sweep.
            return Err(invalid(
                "ws.ping_interval_ms",
                format!(
                    "must be at least {PING_MARGIN_MS} ms below ws.idle_timeout_ms, or pings cannot keep a connection alive"
                ),
            ));
        }
        if ws.close_linger_ms > MAX_CLOSE_LINGER_MS {
            return Err(invalid(
                "ws.close_linger_ms",
                format!("at most {MAX_CLOSE_LINGER_MS} (0: no lingering close)"),
            ));
        }
        if ws.backlog <= 0 {
            return Err(invalid("ws.backlog", "must be above 0"));
        }
        if (1..MIN_CONNECTIONS_PER_SHARD).contains(&ws.max_connections_per_shard) {
            // It was raised to 32 without a word (a trial's 500-slot shards were fine; a 10 was not).
            return Err(invalid(
                "ws.max_connections_per_shard",
                format!(
                    "0 (as many as RLIMIT_NOFILE allows) or at least {MIN_CONNECTIONS_PER_SHARD}: a shard keeps 16 slots of its descriptor table for itself"
                ),
            ));
        }
        let f = &self.fanout;
        if f.merge_window_ms > 5_000 {
            return Err(invalid("fanout.merge_window_ms", "at most 5000: gifts must reach members within 10 s"));
        }
        if f.max_batch_messages == 0 {
            return Err(invalid("fanout.max_batch_messages", "must be above 0"));
        }
        if f.max_batch_bytes < 1024 {
            return Err(invalid("fanout.max_batch_bytes", "must be at least 1024"));
        }
        let s = &self.send;
        if s.max_queue_bytes < f.max_batch_bytes * 2 {
            return Err(invalid(
                "send.max_queue_bytes",
                "must hold at least two full batches (2 x fanout.max_batch_bytes)",
            ));
        }
        if s.max_queue_frames < 2 {
            return Err(invalid("send.max_queue_frames", "must be at least 2"));
        }
        if !(100..=8_000).contains(&s.max_queue_delay_ms) {
            return Err(invalid(
                "send.max_queue_delay_ms",
                "must be between 100 and 8000 (a slow reader's gifts wait behind its queue: within 10 s)",
            ));
        }
        if s.socket_send_buffer > 1 << 30 {
            return Err(invalid("send.socket_send_buffer", "must be at most 1073741824 bytes (0: kernel autotuning)"));
        }
        if s.max_replay_bytes < s.max_queue_bytes {
            return Err(invalid(
                "send.max_replay_bytes",
                "must be at least send.max_queue_bytes (below it every since replay past the queue bound is refused)",
            ));
        }
        if s.socket_notsent_lowat > i32::MAX as usize {
            return Err(invalid("send.socket_notsent_lowat", "must be at most 2147483647 bytes (0: not set)"));
        }
        if s.max_iov == 0 || s.max_iov > 1024 {
            return Err(invalid("send.max_iov", "must be between 1 and 1024 (IOV_MAX)"));
        }
        let u = &self.uring;
        if !u.sq_entries.is_power_of_two() || !(64..=32768).contains(&u.sq_entries) {
            return Err(invalid("uring.sq_entries", "must be a power of two between 64 and 32768"));
        }
        if !u.recv_buffers.is_power_of_two() || u.recv_buffers < 16 || u.recv_buffers > 32768 {
            return Err(invalid("uring.recv_buffers", "must be a power of two between 16 and 32768"));
        }
        if u.recv_buffer_size < 512 || u.recv_buffer_size > 1024 * 1024 {
            return Err(invalid("uring.recv_buffer_size", "must be between 512 and 1048576"));
        }
        if self.ingest.max_body_bytes < 256 {
            return Err(invalid("ingest.max_body_bytes", "must be at least 256"));
        }
        if self.ingest.max_batch == 0 || self.ingest.max_batch > 100_000 {
            return Err(invalid("ingest.max_batch", "must be between 1 and 100000"));
        }
        if self.ingest.max_batch_bytes < 256 || self.ingest.max_batch_bytes > 64 * 1024 * 1024 {
            return Err(invalid("ingest.max_batch_bytes", "must be between 256 and 67108864"));
        }
        if self.ingest.threads == 0 || self.ingest.threads > 64 {
            return Err(invalid("ingest.threads", "must be between 1 and 64"));
        }
        if self.ingest.idempotency_ttl_s > 7 * 86_400 {
            return Err(invalid("ingest.idempotency_ttl_s", "must be at most 604800 (a week)"));
        }
        if self.ingest.idempotency_keys > 10_000_000 {
            return Err(invalid("ingest.idempotency_keys", "must be at most 10000000"));
        }
        // Publish keys (file and ROOMCAST_API_KEYS) well-formed; none only on loopback `http`
        // or with ingest.insecure_no_keys.
        crate::ingest::PublishKeys::from_config(self)?;
        if let Some(bus) = &self.bus {
            if let Err(why) = crate::bus::redis::BusUrl::parse(&bus.url) {
                return Err(invalid("bus", format!("{why} (or unset for the embedded bus)")));
            }
            if bus.min_replicas_acked > 16 {
                return Err(invalid("bus.min_replicas_acked", "must be at most 16"));
            }
            if bus.min_replicas_acked > 0 && !(10..=60_000).contains(&bus.replicas_timeout_ms) {
                return Err(invalid("bus.replicas_timeout_ms", "must be 10..=60000"));
            }
        }
        if let Some(a) = &self.advertise
            && let Err(why) = check_url(a, &["ws://", "wss://"], false)
        {
            return Err(invalid("advertise", format!("must be a ws:// or wss:// URL with a host: {why}")));
        }
        if let Some(a) = &self.advertise
            && self.tls.is_some()
            && !a.starts_with("wss://")
        {
            return Err(invalid("advertise", "must be a wss:// URL: the edge serves TLS ([tls])"));
        }
        if let Some(t) = &self.tls {
            if t.cert.as_os_str().is_empty() {
                return Err(invalid("tls.cert", "must name a PEM certificate file"));
            }
            if t.key.as_os_str().is_empty() {
                return Err(invalid("tls.key", "must name a PEM private key file"));
            }
        }
        if let Some(d) = &self.drain.dispatch_url
            && let Err(why) = check_url(d, &["http://", "https://"], true)
        {
            return Err(invalid(
                "drain.dispatch_url",
                format!("must be an http:// or https:// URL with a host: {why}"),
            ));
        }
        if self.drain.deadline_ms < self.drain.period_ms {
            return Err(invalid("drain.deadline_ms", "must be at least drain.period_ms"));
        }
        // A drain is a rolling restart's step, not a state to stay in: a day is far past any
        // spread clients need, and the timers add these to clocks (an unbounded value such as
        // u64::MAX was accepted and left the drain's end nowhere in time).
        // The period first: `--drain-period-ms` raises the deadline to it, and the error must
        // name what the operator set (a trial got `drain.deadline_ms` for its period).
        if self.drain.period_ms > DRAIN_MAX_MS {
            return Err(invalid("drain.period_ms", format!("must be at most {DRAIN_MAX_MS} (a day)")));
        }
        if self.drain.deadline_ms > DRAIN_MAX_MS {
            return Err(invalid("drain.deadline_ms", format!("must be at most {DRAIN_MAX_MS} (a day)")));
        }
        if self.admin_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return Err(invalid("admin_token", "must be at least 16 characters"));
        }
        if self.kinds.is_empty() {
            return Err(invalid("kinds", "at least one kind must be configured"));
        }
        for name in self.kinds.keys() {
            if roomcast_proto::envelope::validate_kind(name).is_err() {
                return Err(invalid("kinds", format!("bad kind name {name:?}: 1 to 32 bytes of a-z 0-9 _")));
            }
            if name == roomcast_proto::envelope::DELETED_KIND {
                return Err(invalid(
                    "kinds",
                    format!("{name:?} is reserved: it is the kind of moderation's tombstones (docs/PROTOCOL.md)"),
                ));
            }
        }
        if self.moderation.max_bans == 0 || self.moderation.max_bans > 10_000_000 {
            return Err(invalid("moderation.max_bans", "must be between 1 and 10000000"));
        }
        if self.moderation.max_ban_s == 0 || self.moderation.max_ban_s > 10 * 365 * 86_400 {
            return Err(invalid("moderation.max_ban_s", "must be between 1 and 315360000 (ten years)"));
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.room_rate", l.room_rate),
            ("limits.user_rate", l.user_rate),
            ("limits.must_deliver_room_rate", l.must_deliver_room_rate),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(invalid(key, "must be a positive number"));
            }
        }
        for (key, v) in [
            ("limits.room_burst", l.room_burst),
            ("limits.user_burst", l.user_burst),
            ("limits.must_deliver_room_burst", l.must_deliver_room_burst),
        ] {
            if !(v >= 1.0 && v.is_finite()) {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.history.must_deliver > 1_000_000 {
            return Err(invalid("history.must_deliver", "at most 1000000 per room"));
        }
        if self.history.join_last > self.history.must_deliver + self.history.droppable {
            return Err(invalid("history.join_last", "cannot exceed what history keeps"));
        }
        let a = &self.adaptive;
        if a.max_window_ms < self.fanout.merge_window_ms || a.max_window_ms > 5_000 {
            return Err(invalid(
                "adaptive.max_window_ms",
                "must be between fanout.merge_window_ms and 5000 (gifts within 10 s)",
            ));
        }
        if a.low_water_bytes >= a.high_water_bytes {
            return Err(invalid("adaptive.low_water_bytes", "must be below adaptive.high_water_bytes"));
        }
        if !a.visible_rate.is_finite() || a.visible_rate <= 0.0 {
            return Err(invalid("adaptive.visible_rate", "must be a finite number above 0"));
        }
        if !(a.min_visible_rate > 0.0 && a.min_visible_rate <= a.visible_rate) {
            return Err(invalid("adaptive.min_visible_rate", "must be above 0 and at most adaptive.visible_rate"));
        }
        if !a.room_frames_per_s.is_finite() || a.room_frames_per_s <= 0.0 {
            return Err(invalid("adaptive.room_frames_per_s", "must be a finite number above 0"));
        }
        if !a.room_deliveries_per_s.is_finite() || a.room_deliveries_per_s <= 0.0 {
            return Err(invalid("adaptive.room_deliveries_per_s", "must be a finite number above 0"));
        }
        // Below twice the merge window the controller can never see gifts early enough to
        // relax chat again (a new user's trial at 50 ms: chat pinned at the floor, rho
        // swinging); over 9 s it would steer gifts to the edge of their 10 s promise.
        if a.gift_latency_target_ms < (2 * self.fanout.merge_window_ms).max(200) || a.gift_latency_target_ms > 9_000 {
            return Err(invalid(
                "adaptive.gift_latency_target_ms",
                "must be between max(200, 2 x fanout.merge_window_ms) and 9000",
            ));
        }
        if !(10..=60_000).contains(&self.probes.interval_ms) {
            return Err(invalid("probes.interval_ms", "must be between 10 and 60000"));
        }
        let h = &self.health;
        if h.close_wait_degraded > h.close_wait_overloaded {
            return Err(invalid("health.close_wait_degraded", "must not exceed health.close_wait_overloaded"));
        }
        if h.send_queue_p99_degraded_bytes > h.send_queue_p99_overloaded_bytes {
            return Err(invalid(
                "health.send_queue_p99_degraded_bytes",
                "must not exceed health.send_queue_p99_overloaded_bytes",
            ));
        }
        for (key, v) in [
            ("health.accept_queue_degraded", h.accept_queue_degraded),
            ("health.accept_queue_overloaded", h.accept_queue_overloaded),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(invalid(key, "must be a fraction above 0 (1.0 = the queue's limit)"));
            }
        }
        if h.accept_queue_degraded > h.accept_queue_overloaded {
            return Err(invalid("health.accept_queue_degraded", "must not exceed health.accept_queue_overloaded"));
        }
        for (key, v) in [
            ("health.retransmits_degraded_per_s", h.retransmits_degraded_per_s),
            ("health.retransmits_overloaded_per_s", h.retransmits_overloaded_per_s),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(invalid(key, "must be a positive number"));
            }
        }
        if h.retransmits_degraded_per_s > h.retransmits_overloaded_per_s {
            return Err(invalid(
                "health.retransmits_degraded_per_s",
                "must not exceed health.retransmits_overloaded_per_s",
            ));
        }
        Ok(())
    }

    /// The URL dispatch hands out for this edge (a bare `ws://host:port` gets the `/ws` path;
    /// without `advertise`, `wss://` when the edge serves TLS).
    pub fn advertised_url(&self, ws: SocketAddr) -> String {
        if let Some(a) = &self.advertise {
            let a = a.trim_end_matches('/');
            let after_scheme = a.split_once("://").map_or(a, |(_, rest)| rest);
            return if after_scheme.contains('/') { a.to_owned() } else { format!("{a}/ws") };
        }
        let host = if ws.ip().is_unspecified() { "127.0.0.1".to_owned() } else { ws.ip().to_string() };
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{host}:{}/ws", ws.port())
    }

    /// This edge's name in load reports and online counts: `edge_id`, else the advertised URL.
    pub fn edge_name(&self, ws: SocketAddr) -> String {
        self.edge_id.clone().unwrap_or_else(|| self.advertised_url(ws))
    }

    /// The dispatch endpoint `goaway` sends clients to: `drain.dispatch_url`, else this edge's
    /// own `/v1/route` on the host clients already reach (the HTTP listen address, or the
    /// advertised host when HTTP listens on every interface). The bool says whether that
    /// address is only a guess that clients elsewhere cannot use.
    pub fn dispatch_url(&self, http: SocketAddr) -> (String, bool) {
        if let Some(d) = &self.drain.dispatch_url {
            return (d.clone(), false);
        }
        // The HTTP API over TLS (`tls.http`): https.
        let scheme = if self.tls.as_ref().is_some_and(|t| t.http) { "https" } else { "http" };
        if !http.ip().is_unspecified() {
            let host = match http.ip() {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 @ std::net::IpAddr::V4(_) => v4.to_string(),
            };
            return (format!("{scheme}://{host}:{}/v1/route", http.port()), false);
        }
        match self.advertise.as_deref().and_then(url_host) {
            Some(host) => (format!("{scheme}://{host}:{}/v1/route", http.port()), false),
            None => (format!("{scheme}://127.0.0.1:{}/v1/route", http.port()), true),
        }
    }

    /// The kinds delivery latency is measured for
    /// (`roomcast_delivery_latency_kind_seconds{kind}`), in index order (`KindSince::kind`):
    /// the configured kinds, then moderation's tombstones (`deleted`). A fixed set, known at
    /// start: a kind no one configured (another edge's, with a shared bus) adds no series.
    pub fn latency_kinds(&self) -> Vec<String> {
        self.kinds.keys().cloned().chain([roomcast_proto::envelope::DELETED_KIND.to_owned()]).collect()
    }

    /// Whether `kind` must be delivered; None if the kind is not configured.
    pub fn must_deliver(&self, kind: &str) -> Option<bool> {
        self.kinds.get(kind).map(|k| k.must_deliver)
    }

    /// Shard count after resolving 0 = one per allowed CPU.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 { crate::sys::allowed_cpus().len().clamp(1, MAX_SHARDS) } else { self.shards }
    }

    /// The merge window as a Duration (`fanout.merge_window_ms`).
    pub fn merge_window(&self) -> Duration {
        Duration::from_millis(self.fanout.merge_window_ms)
    }
}

/// A URL with one of `schemes`, a host, no fragment, and a query only with `query` (the edge
/// appends `?room=` to an advertised URL).
fn check_url(url: &str, schemes: &[&str], query: bool) -> Result<(), &'static str> {
    let Some(scheme) = schemes.iter().find(|s| url.starts_with(**s)) else { return Err("wrong scheme") };
    let rest = &url[scheme.len()..];
    if url_host(url).is_none_or(str::is_empty) || rest.starts_with(':') {
        return Err("no host");
    }
    if rest.contains('#') || rest.contains(char::is_whitespace) || (!query && rest.contains('?')) {
        return Err("a query, fragment or space");
    }
    Ok(())
}

/// `host` of `scheme://host[:port][/path]` (brackets kept for IPv6).
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if authority.starts_with('[') {
        return authority.find(']').map(|i| &authority[..=i]);
    }
    Some(authority.split(':').next().unwrap_or(authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `deleted` is moderation's tombstone kind: nobody may configure (and so publish) it.
    #[test]
    fn the_tombstone_kind_is_reserved() {
        let c = Config::from_toml("[kinds.deleted]\nmust_deliver = true\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("kinds:") && e.contains("reserved"), "{e}");
        let c = Config::from_toml("[moderation]\nmax_bans = 0\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().starts_with("moderation.max_bans"));
    }

    /// Values that pass a type check but cannot work or would break the 10 s promise (found
    /// by a new user's trial: each started the edge).
    #[test]
    fn latency_settings_that_break_the_promise_are_refused() {
        let err = |text: &str| Config::from_toml(text).and_then(|c| c.validate()).err().map(|e| e.to_string());
        for (text, key) in [
            ("[send]\nsocket_send_buffer = 4294967296\n", "send.socket_send_buffer"),
            ("[send]\nmax_queue_delay_ms = 18446744073709551615\n", "send.max_queue_delay_ms"),
            ("[send]\nmax_replay_bytes = 0\n", "send.max_replay_bytes"),
            ("[adaptive]\ngift_latency_target_ms = 50\n", "adaptive.gift_latency_target_ms"),
            ("[adaptive]\ngift_latency_target_ms = 60000\n", "adaptive.gift_latency_target_ms"),
            (
                "[fanout]\nmerge_window_ms = 500\n[adaptive]\ngift_latency_target_ms = 900\n",
                "adaptive.gift_latency_target_ms",
            ),
            ("[adaptive]\nvisible_rate = inf\n", "adaptive.visible_rate"),
            ("[adaptive]\nroom_deliveries_per_s = inf\n", "adaptive.room_deliveries_per_s"),
            ("[adaptive]\nroom_frames_per_s = inf\n", "adaptive.room_frames_per_s"),
        ] {
            assert!(err(text).is_some_and(|e| e.contains(key)), "{text:?}: {:?}", err(text));
        }
        assert_eq!(err("[adaptive]\ngift_latency_target_ms = 200\n"), None);
        assert_eq!(err("[send]\nmax_queue_delay_ms = 8000\nsocket_send_buffer = 0\n"), None);
        assert_eq!(err(""), None, "the defaults pass");
    }

    /// A trial's `max_connections_per_shard = 10` was raised to 32 without a word.
    #[test]
    fn a_shard_table_too_small_is_refused_by_name() {
        let err = |text: &str| Config::from_toml(text).and_then(|c| c.validate()).err().map(|e| e.to_string());
        assert!(
            err("[ws]\nmax_connections_per_shard = 10\n").is_some_and(|e| e.contains("ws.max_connections_per_shard"))
        );
        assert!(err("[ws]\nmax_connections_per_shard = 32\n").is_none());
        assert!(err("[ws]\nmax_connections_per_shard = 0\n").is_none());
    }

    #[test]
    fn send_low_water_mark_is_checked() {
        let err = |text: &str| Config::from_toml(text).and_then(|c| c.validate()).err().map(|e| e.to_string());
        assert!(
            err("[send]\nsocket_notsent_lowat = 4294967296\n").is_some_and(|e| e.contains("send.socket_notsent_lowat"))
        );
        assert!(err("[send]\nsocket_notsent_lowat = 0\n").is_none());
        assert_eq!(Config::default().send.socket_notsent_lowat, 16 * 1024);
    }

    /// The idle timeout is also the listeners' TCP_USER_TIMEOUT (a C int of ms): a value the
    /// kernel refuses is refused here, naming the key (the trial's 3,000,000,000 passed the
    /// check and then failed the start with "Invalid argument").
    #[test]
    fn an_idle_timeout_the_kernel_would_refuse_is_refused_by_name() {
        let err = |text: &str| Config::from_toml(text).and_then(|c| c.validate()).err().map(|e| e.to_string());
        assert!(err("[ws]\nidle_timeout_ms = 3000000000\n").is_some_and(|e| e.contains("ws.idle_timeout_ms")));
        assert!(err("[ws]\nidle_timeout_ms = 86400000\n").is_none());
        // A ping must be able to go out on the 250 ms sweep and its pong come back in time.
        let close = "[ws]\nping_interval_ms = 8800\nidle_timeout_ms = 9000\n";
        assert!(err(close).is_some_and(|e| e.contains("ws.ping_interval_ms") && e.contains("500 ms below")));
        assert!(err("[ws]\nping_interval_ms = 8500\nidle_timeout_ms = 9000\n").is_none());
    }

    /// The lingering close holds a closed connection's slot: bounded, and 0 turns it off.
    #[test]
    fn the_close_linger_is_bounded() {
        let err = |text: &str| Config::from_toml(text).and_then(|c| c.validate()).err().map(|e| e.to_string());
        assert_eq!(Config::default().ws.close_linger_ms, 2_000);
        assert!(err("[ws]\nclose_linger_ms = 30001\n").is_some_and(|e| e.contains("ws.close_linger_ms")));
        assert!(err("[ws]\nclose_linger_ms = 30000\n").is_none());
        assert!(err("[ws]\nclose_linger_ms = 0\n").is_none());
    }

    #[test]
    fn store_settings_that_cannot_work_are_refused() {
        let err = |text: &str| Config::from_toml(text).and_then(|c| c.validate()).err().map(|e| e.to_string());
        assert!(err("data_dir = \"\"\n").is_some_and(|e| e.contains("data_dir")));
        assert!(err("data_dir = \"\"\n[store]\nenabled = false\n").is_none(), "no store, no directory needed");
        assert!(err("[store]\nfsync = 18446744073709551615\n").is_some_and(|e| e.contains("store.fsync")));
        assert!(err("[store]\nfsync = 60000\n").is_none());
    }

    /// A drain's deadline is bounded (a day); a trial's u64::MAX was accepted.
    #[test]
    fn a_drain_lasts_at_most_a_day() {
        let err = |text: &str| Config::from_toml(text).and_then(|c| c.validate()).err().map(|e| e.to_string());
        let e = err("[drain]\ndeadline_ms = 18446744073709551615\n").expect("u64::MAX accepted");
        assert!(e.contains("drain.deadline_ms") && e.contains("at most 86400000"), "{e}");
        let e = err("[drain]\nperiod_ms = 86400001\ndeadline_ms = 86400001\n").expect("over a day accepted");
        assert!(e.contains("drain.period_ms"), "names the period, the longer of the two set: {e}");
        assert_eq!(err("[drain]\nperiod_ms = 3600000\ndeadline_ms = 86400000\n"), None);
    }

    #[test]
    fn advertised_and_dispatch_urls_must_be_usable_as_they_are() {
        let err = |text: &str| Config::from_toml(text).and_then(|c| c.validate()).err().map(|e| e.to_string());
        for bad in ["http://h:1/ws", "ws://", "ws://:9000/ws", "ws://h/ws?x=1", "ws://h/ws#f", "ws://h /ws"] {
            let e = err(&format!("advertise = \"{bad}\"\n")).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains("advertise"), "{e}");
        }
        for bad in ["ws://h/v1/route", "https://", "http://h/r#x"] {
            let e = err(&format!("[drain]\ndispatch_url = \"{bad}\"\n")).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains("drain.dispatch_url"), "{e}");
        }
        assert_eq!(err("[drain]\ndispatch_url = \"https://d.example/v1/route?region=eu\"\n"), None);
        let c = |text: &str| Config::from_toml(text).unwrap();
        let ws: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(c("advertise = \"wss://live.example\"\n").advertised_url(ws), "wss://live.example/ws");
        assert_eq!(c("advertise = \"ws://[::1]:9/\"\n").advertised_url(ws), "ws://[::1]:9/ws");
        let tls = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        assert!(c(tls).advertised_url(ws).starts_with("wss://"), "TLS without advertise: wss");
        let e = err(&format!("advertise = \"ws://h:1/ws\"\n{tls}")).expect("ws:// advertised for a TLS edge");
        assert!(e.contains("advertise") && e.contains("wss://"), "{e}");
        assert!(err("[tls]\ncert = \"c.pem\"\n").is_some_and(|e| e.contains("key")), "[tls] without key");
        assert_eq!(c("advertise = \"wss://e.example/edge7/ws\"\n").advertised_url(ws), "wss://e.example/edge7/ws");
        // goaway's dispatch URL: the HTTP address, or the advertised host when HTTP is on every
        // interface, or a loopback guess that is flagged.
        let http: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(
            c("advertise = \"wss://live.example:443/ws\"\n").dispatch_url(http),
            ("http://live.example:8080/v1/route".to_owned(), false)
        );
        assert_eq!(c("").dispatch_url(http), ("http://127.0.0.1:8080/v1/route".to_owned(), true));
        assert_eq!(c("").dispatch_url("[::1]:8080".parse().unwrap()), ("http://[::1]:8080/v1/route".to_owned(), false));
    }

    /// However a secret is spelled, a config error never quotes it (the value appeared through
    /// serde's "invalid type: integer `...`" for quoted keys, inline tables and dotted keys).
    #[test]
    fn the_bus_is_a_url_or_a_table() {
        let c = Config::from_toml("bus = \"redis-cluster://10.0.0.1:7000,10.0.0.2:7000\"\n").unwrap();
        assert_eq!(c.bus, Some(BusConfig::new("redis-cluster://10.0.0.1:7000,10.0.0.2:7000")));
        c.validate().unwrap();
        let c = Config::from_toml("[bus]\nurl = \"redis://h:6379\"\nmin_replicas_acked = 1\n").unwrap();
        // Errors name the key (a trial got "expected a URL, or a table ..." for both).
        let typo = Config::from_toml("[bus]\nurl = \"redis://h:6379\"\nmin_replica_acked = 1\n").unwrap_err();
        assert!(typo.to_string().contains("bus.min_replica_acked: unknown key"), "{typo}");
        let negative = Config::from_toml("[bus]\nurl = \"redis://h:6379\"\nmin_replicas_acked = -1\n").unwrap_err();
        assert!(negative.to_string().contains("bus.min_replicas_acked: expected a whole number"), "{negative}");
        let b = c.bus.clone().unwrap();
        assert_eq!((b.url.as_str(), b.min_replicas_acked, b.replicas_timeout_ms), ("redis://h:6379", 1, 1000));
        c.validate().unwrap();
        assert!(
            Config::from_toml("[bus]\nurl = \"redis://h:1\"\nmin_replica_acked = 1\n").is_err(),
            "typos are refused"
        );
        let c = Config::from_toml("bus = \"redis-cluster://h\"\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("bus"));
        let c = Config::from_toml("[bus]\nurl = \"redis://h:1\"\nmin_replicas_acked = 1\nreplicas_timeout_ms = 0\n")
            .unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("replicas_timeout_ms"));
    }

    #[test]
    fn config_errors_never_quote_a_secret() {
        let secret = "98765432109876543210";
        for text in [
            format!("admin_token = {secret}\n"),
            format!("'admin_token' = {secret}\n"),
            format!("[ingest]\nkeys = [{{ name = \"k\", key = {secret} }}]\n"),
            format!("auth.hs256_secret = {secret}\n"),
            format!("[auth]\n\"hs256_secret\" = {secret}\n"),
            format!("bus = {secret}\n"),
            format!("shards = \"{secret}\"\n"),
        ] {
            let e = Config::from_toml(&text).unwrap_err().to_string();
            assert!(!e.contains(secret), "{text:?} -> {e}");
            assert!(e.contains("line"), "still says where: {e}");
        }
        // Names stay: a typo is still named.
        let e = Config::from_toml("[ws]\nmax_mesage = 1\n").unwrap_err().to_string();
        assert!(e.contains("max_mesage"), "{e}");
    }

    #[test]
    fn origin_patterns_must_name_a_host() {
        for bad in [
            "https://*",
            "https://*example.com",
            "https://*.",
            "http://a b",
            "https://x.com/",
            "ftp://x.com",
            "https://x.com:port",
        ] {
            let c = Config::from_toml(&format!("[ws]\nallowed_origins = [\"{bad}\"]\n")).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        for good in ["https://*.example.com", "http://localhost:3000", "https://live.example.com", "http://[::1]:8080"]
        {
            let c = Config::from_toml(&format!("[ws]\nallowed_origins = [\"{good}\"]\n")).unwrap();
            c.validate().unwrap();
        }
    }

    #[test]
    fn urls_in_logs_hide_their_password() {
        assert_eq!(redact_url("redis://:pw-secret@10.0.0.1:6379/0"), "redis://:<redacted>@10.0.0.1:6379/0");
        assert_eq!(redact_url("redis://user:pw@h"), "redis://user:<redacted>@h");
        assert_eq!(redact_url("redis://onlyone@h"), "redis://<redacted>@h");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact_url("redis://h/?password=x@y"), "redis://h/?password=x@y".to_string());
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_values_override_defaults() {
        let c = Config::from_toml("shards = 3\n[fanout]\nmerge_window_ms = 0\n").unwrap();
        assert_eq!(c.shards, 3);
        assert_eq!(c.fanout.merge_window_ms, 0);
        assert_eq!(c.fanout.max_batch_messages, 256);
        c.validate().unwrap();
    }

    #[test]
    fn takeover_is_off_unless_asked() {
        assert!(!Config::default().takeover);
        assert!(Config::from_toml("takeover = true\n").unwrap().takeover);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[fanout]\nmerge_windw_ms = 5\n").unwrap_err().to_string();
        assert!(e.contains("merge_windw_ms"), "{e}");
        let e = Config::from_toml("[ws]\nmax_message = \"big\"\n").unwrap_err().to_string();
        assert!(e.contains("max_message"), "{e}");
        // A bad line holding a credential is located, never quoted (it used to be, whole).
        for text in [
            "[[ingest.keys]]\nname = \"k\"\nkey = \"TOPSECRET-VALUE-1234\\q\"\n",
            "[[ingest.keys]]\nname = \"k\"\nkey = 12345678901234567890\n",
            "[auth]\nhs256_secret = [\"TOPSECRET-VALUE-1234\"]\n",
            "admin_token = 1234567890123456789\n",
        ] {
            let e = Config::from_toml(text).unwrap_err().to_string();
            assert!(!e.contains("TOPSECRET") && !e.contains("1234567890"), "{e}");
            assert!(e.contains("line"), "{e}");
        }
        let c = Config::from_toml("[fanout]\nmerge_window_ms = 60000\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("fanout.merge_window_ms:"), "{e}");
        let c = Config::from_toml("[uring]\nrecv_buffers = 1000\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().starts_with("uring.recv_buffers:"));
        let c = Config::from_toml("[health]\nclose_wait_degraded = 10\nclose_wait_overloaded = 5\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().starts_with("health.close_wait_degraded:"));
        let e = Config::from_toml("[probes]\nsource = \"dtrace\"\n").unwrap_err().to_string();
        assert!(e.contains("source"), "{e}");
    }
}
