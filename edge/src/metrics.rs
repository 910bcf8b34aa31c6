//! Counters for /metrics (Prometheus text format, via the `prometheus` crate).
//!
//! Each shard gets its own labelled child of every family up front and increments it alone, so
//! the hot path does relaxed atomic adds on cache lines no other core writes. A scrape reads
//! them all; the kernel probes append their own families after.

use prometheus::core::Collector;
use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use roomcast_ebpf::{QueueStats, Snapshot};

use crate::health::{HealthReport, KernelView};

/// Why a connection closed: the `reason` label of `roomcast_connections_closed_total`. The
/// first cause wins (a member closed for idleness whose peer then resets stays `idle_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseWhy {
    /// The client closed (a close frame, or end of stream).
    PeerClosed,
    /// The connection failed under us: reset, or a read or write error.
    PeerReset,
    /// No complete upgrade within `ws.handshake_timeout_ms`.
    HandshakeTimeout,
    /// The upgrade was answered with an HTTP error (bad request, token, origin...).
    HandshakeRefused,
    /// Refused with 503 because the edge is overloaded, unhealthy or draining.
    Overloaded,
    /// Nothing heard from the client and no message frame taken within `ws.idle_timeout_ms`,
    /// a write stalled that long, or our bytes unacknowledged that long (TCP_USER_TIMEOUT).
    IdleTimeout,
    /// Its send queue passed its bound (4000).
    SlowConsumer,
    /// Its `since` replay did not fit the shard's replay budget (1013).
    ReplayBudget,
    /// Redis did not answer the read of its `since` replay (1013: it comes back with the same
    /// `since`).
    RecoveryUnavailable,
    /// Redis did not give the seq of a room this edge did not follow yet within 10 s of its
    /// join (1013: it comes back).
    RoomUnavailable,
    /// A WebSocket protocol violation, a signalling flood, or an event stream's client talking.
    ProtocolError,
    /// Its token expired without a refresh (4001).
    TokenExpired,
    /// A moderator's disconnect, or a ban of an event stream.
    Moderated,
    /// Sent away by a drain (goaway, then 1001).
    Drain,
    /// The edge stopped.
    Shutdown,
    /// A request answered in full and closed (an SSE preflight).
    Answered,
    /// Bad TLS input on a `wss` listener: not TLS (a plain `ws://` client), a failed
    /// handshake, or a record that does not decrypt.
    TlsError,
    /// Never held: the kernel accepted it for a shard whose table of direct descriptors was
    /// full (`ws.max_connections_per_shard`, or RLIMIT_NOFILE) and closed it at once.
    TableFull,
}

impl CloseWhy {
    /// Every reason, in declaration order (the index of each is its discriminant).
    pub const ALL: [CloseWhy; 18] = [
        Self::PeerClosed,
        Self::PeerReset,
        Self::HandshakeTimeout,
        Self::HandshakeRefused,
        Self::Overloaded,
        Self::IdleTimeout,
        Self::SlowConsumer,
        Self::ReplayBudget,
        Self::RecoveryUnavailable,
        Self::RoomUnavailable,
        Self::ProtocolError,
        Self::TokenExpired,
        Self::Moderated,
        Self::Drain,
        Self::Shutdown,
        Self::Answered,
        Self::TlsError,
        Self::TableFull,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::PeerReset => "peer_reset",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::HandshakeRefused => "handshake_refused",
            Self::Overloaded => "overloaded",
            Self::IdleTimeout => "idle_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::ReplayBudget => "replay_budget",
            Self::RecoveryUnavailable => "recovery_unavailable",
            Self::RoomUnavailable => "room_unavailable",
            Self::ProtocolError => "protocol_error",
            Self::TokenExpired => "token_expired",
            Self::Moderated => "moderated",
            Self::Drain => "drain",
            Self::Shutdown => "shutdown",
            Self::Answered => "answered",
            Self::TlsError => "tls_error",
            Self::TableFull => "table_full",
        }
    }
}

/// A shard's `connections_closed_total` children, one per reason, made up front.
#[derive(Clone)]
pub struct ClosedBy(Vec<IntCounter>);

impl ClosedBy {
    /// Counts one close for `why`.
    pub fn inc(&self, why: CloseWhy) {
        if let Some(c) = self.0.get(why as usize) {
            c.inc();
        }
    }
}

/// How a lingering close ended: the `outcome` label of `roomcast_close_lingers_total`
/// (`ws.close_linger_ms`; shard/lifecycle.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LingerEnd {
    /// The peer's FIN came: everything it sent was read, the close is clean (no reset).
    Fin,
    /// `ws.close_linger_ms` ran out first (a peer that neither answered nor closed).
    Timeout,
    /// The peer sent more than the byte bound after the edge's close: cut (reset).
    Bytes,
    /// The peer reset the connection, or a read failed.
    Error,
}

impl LingerEnd {
    /// Every outcome, in declaration order (the index of each is its discriminant).
    pub const ALL: [LingerEnd; 4] = [Self::Fin, Self::Timeout, Self::Bytes, Self::Error];

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::Timeout => "timeout",
            Self::Bytes => "bytes",
            Self::Error => "error",
        }
    }
}

/// A shard's `close_lingers_total` children, one per outcome, made up front.
#[derive(Clone)]
pub struct LingersBy(Vec<IntCounter>);

/// Refused or timed-out upgrades of one shard, by the HTTP status answered (`timeout` for a
/// handshake that did not complete in time): a 401 (token) is told from a 403 (origin), a 400
/// (bad request) and a 503 (overloaded). The statuses are the edge's own, a handful.
#[derive(Clone)]
pub struct RefusalsBy {
    vec: IntCounterVec,
    shard: String,
}

impl RefusalsBy {
    /// Counts one refusal answered with `status` (or `timeout`).
    pub fn inc(&self, status: &str) {
        self.vec.with_label_values(&[self.shard.as_str(), status]).inc();
    }
}

impl LingersBy {
    /// Counts one lingering close that ended with `end`.
    pub fn inc(&self, end: LingerEnd) {
        if let Some(c) = self.0.get(end as usize) {
            c.inc();
        }
    }
}

/// Every family the edge exports.
pub struct Metrics {
    registry: Registry,
    shard: ShardFamilies,
    /// The engines' and the publish API's families.
    pub bus: BusStats,
    /// 1 while the edge drains.
    pub draining: IntGauge,
    /// 1 while a drain's goaways wait for the fleet (`edge/src/drain.rs`).
    pub drain_held: IntGauge,
    /// Times a drain's goaways began to wait for the fleet.
    pub drain_holds: IntCounter,
    /// Per-thread perf counters (crate::perfcount).
    pub perf: crate::perfcount::PerfFamilies,
    /// The moderation API's requests and refusals, and the bans in force.
    pub moderation: crate::moderation::ModerationStats,
    /// Moderation bans in force known to this edge (with Redis: every edge's).
    pub bans: IntGauge,
    /// permessage-deflate's counters.
    pub deflate: crate::deflate::DeflateStats,
    /// SIGHUP reloads of the TLS certificate, by outcome (ok, failed: the old one stays).
    pub tls_reloads: IntCounterVec,
    /// The kinds the per-kind delivery latency has series for (`Config::latency_kinds`).
    kinds: Vec<String>,
}

/// Delivery latency's bucket bounds, seconds: by class and by kind alike.
const LATENCY_BUCKETS: [f64; 21] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 5.0, 7.5, 10.0,
    20.0,
];

/// `roomcast_delivery_latency_kind_seconds`'s name and help, for the family summed at scrapes.
const KIND_LATENCY: (&str, &str) = (
    "delivery_latency_kind_seconds",
    "Delivery latency by kind, edge-wide (the shards summed): from the arrival of the oldest message of the kind a frame carries at its room's batch to the completion of the frame's write to the member (sampled 1 in 16, the frames roomcast_delivery_latency_seconds samples). One series per configured kind, and deleted for moderation's tombstones.",
);

struct ShardFamilies {
    connections: IntGaugeVec,
    sse_connections: IntGaugeVec,
    sse_refused: IntCounterVec,
    accepted: IntCounterVec,
    closed: IntCounterVec,
    lingers: IntCounterVec,
    handshake_failures: IntCounterVec,
    handshake_refusals: IntCounterVec,
    protocol_errors: IntCounterVec,
    frames_written: IntCounterVec,
    bytes_written: IntCounterVec,
    messages_delivered: IntCounterVec,
    slow_consumer_closes: IntCounterVec,
    shed_bytes: IntCounterVec,
    latency: HistogramVec,
    /// Edge-wide (one series: handshakes are rare beside deliveries, and a histogram per shard
    /// would be 61 x 21 series at 10^6 members).
    handshake: Histogram,
    /// By shard and kind, not registered: each shard observes into children of its own (no
    /// cache line shared with another core), and a scrape sums them into one series per kind.
    latency_kind: HistogramVec,
    frames_per_cpu_s: GaugeVec,
    busy: GaugeVec,
    cpu_share: GaugeVec,
    send_errors: IntCounterVec,
    rooms: IntGaugeVec,
    send_queue_bytes: IntGaugeVec,
    accept_errors: IntCounterVec,
    goaways: IntCounterVec,
    resets: IntCounterVec,
    signals_refused: IntCounterVec,
    refused: IntCounterVec,
    moderated: IntCounterVec,
}

/// One shard's handles (cheap clones of the shared atomics).
#[derive(Clone)]
pub struct ShardStats {
    /// The perf counter families: the shard opens its own counters on its thread.
    pub perf: crate::perfcount::PerfFamilies,
    /// Open connections (accepted, not yet closed): WebSocket, SSE and requests not yet answered.
    pub connections: IntGauge,
    /// Open SSE streams (answered 200, not yet closed): the `/sse` share of `connections`.
    pub sse_connections: IntGauge,
    /// `/sse` requests refused with an HTTP error (also in `handshake_failures`).
    pub sse_refused: IntCounter,
    /// TCP connections accepted.
    pub accepted: IntCounter,
    /// Connections closed, by reason.
    pub closed: ClosedBy,
    /// Lingering closes (after the edge's last bytes and FIN), by how they ended.
    pub lingers: LingersBy,
    /// Upgrades refused with an HTTP error or timed out.
    pub handshake_failures: IntCounter,
    /// The same, by the status answered (`handshake_refusals_total{status}`).
    pub handshake_refusals: RefusalsBy,
    /// Connections closed for a WebSocket protocol violation (1002, 1007, 1009).
    pub protocol_errors: IntCounter,
    /// WebSocket frames fully written to sockets.
    pub frames_written: IntCounter,
    /// Bytes written to sockets.
    pub bytes_written: IntCounter,
    /// Published messages written to member sockets (one per message per member).
    pub messages_delivered: IntCounter,
    /// Connections closed (4000) because their send queue passed its bound.
    pub slow_consumer_closes: IntCounter,
    /// Queued bytes of droppable messages dropped for connections that fell behind.
    pub shed_bytes: IntCounter,
    /// Delivery latency (the oldest message's arrival at its batch to the completion of the
    /// write to a member), sampled: frames
    /// carrying must-deliver messages, and droppable-only frames.
    pub latency_must: Histogram,
    /// Delivery latency of droppable-only frames (see `latency_must`).
    pub latency_droppable: Histogram,
    /// Delivery latency per kind, indexed by `KindSince::kind`, on the same sampled frames:
    /// each kind from its own oldest message in the frame.
    pub latency_kind: Vec<Histogram>,
    /// From a connection's accept to the completion of the write of its 101 answer.
    pub handshake_seconds: Histogram,
    /// The shard's measured capacity: frames written per second of its thread's CPU time
    /// (EWMA).
    pub frames_per_cpu_s: Gauge,
    /// The share of wall time the shard's thread was busy (EWMA).
    pub busy: Gauge,
    /// The share of the CPU the shard's thread got while it wanted to run (EWMA).
    pub cpu_share: Gauge,
    /// Sends that failed (peer reset, broken pipe).
    pub send_errors: IntCounter,
    /// Rooms with at least one member on this shard.
    pub rooms: IntGauge,
    /// Bytes queued for sending over all the shard's connections, sampled each tick.
    pub send_queue_bytes: IntGauge,
    /// Accept completions with an error (ENFILE: direct descriptor table full).
    pub accept_errors: IntCounter,
    /// goaway messages sent while draining.
    pub goaways: IntCounter,
    /// Joins answered with a `reset` (the client's epoch or since was void).
    pub resets: IntCounter,
    /// Signalling messages refused: over the connection's rate, a join the engine refused, or a
    /// malformed message (`bad_message`, `bad_room`).
    pub signals_refused: IntCounter,
    refused: IntCounterVec,
    /// Connections closed by a moderator's disconnect, and removed from a room by a ban.
    pub kicked: IntCounter,
    /// Members removed from a room because a ban covers them.
    pub banned_out: IntCounter,
    /// permessage-deflate's counters (edge-wide).
    pub deflate: crate::deflate::DeflateStats,
    shard_label: String,
}

impl ShardStats {
    /// Counts a refusal by the trust rules (`roomcast_connections_refused_total{reason}`).
    pub fn refused(&self, reason: &str) {
        self.refused.with_label_values(&[self.shard_label.as_str(), reason]).inc();
    }
}

/// The room engines' figures (all engines add to the same children) and the publish API's.
#[derive(Clone)]
pub struct BusStats {
    /// Messages accepted for publishing, by kind.
    pub messages_in: IntCounterVec,
    /// Messages dropped, by kind and reason.
    pub messages_dropped: IntCounterVec,
    /// Merged batches flushed (each serialized once per encoding in use).
    pub batches: IntCounter,
    /// Messages flushed in batches (their ratio to `batches` is the merge factor).
    pub batch_messages: IntCounter,
    /// Rooms known to the engines (with members or a sequence).
    pub rooms: IntGauge,
    /// Publish requests refused, by reason.
    pub publish_rejected: IntCounterVec,
    /// Publishes refused as `engine_busy`, by cause: `upstream_full` (the engine's publish
    /// lane is full), `output_backlog` (its output for some shard is at its bound),
    /// `redis_queue` (too many publishes wait for Redis).
    pub engine_busy: IntCounterVec,
    /// Admin API requests refused, by reason: `disabled` (no admin_token), `unauthorized`
    /// (missing or wrong token), `parameters` (a query or body the endpoint does not take).
    pub admin_refused: IntCounterVec,
    /// By engine (label `engine`): each engine reports its own rooms.
    pub hot_window_seconds: GaugeVec,
    /// 1 while some hot room of the engine has its droppable messages sampled down, by engine.
    pub sampling: IntGaugeVec,
    /// Rooms read back from the store (after a restart, or after leaving memory when idle).
    pub rooms_restored: IntCounter,
    /// Publishes answered from an earlier one with the same idempotency key (nothing published).
    pub publish_replayed: IntCounter,
    /// Redis mode: reads of Redis for joins whose `since` is older than the edge's history
    /// (one per room at a time, shared by the joins waiting on it).
    pub recovery_reads: IntCounter,
    /// Redis mode: joins answered through such a read (their ratio to `recovery_reads` is the
    /// sharing).
    pub recovery_joins: IntCounter,
    /// Publish API requests, from the handler's start to its answer, by outcome.
    pub publish_seconds: HistogramVec,
    /// Bytes the store uses on disk.
    pub store_bytes: IntGauge,
    /// Starts at which the store found it could not vouch for what is on disk, by reason:
    /// every room read back takes a new epoch.
    pub store_renumbered: IntCounterVec,
    /// With a shared bus: 1 while Redis is reachable (publishes get 503 while it is not).
    pub bus_up: IntGauge,
    /// 1 when the edge runs with a shared bus (Redis), 0 alone.
    pub bus_shared: IntGauge,
    /// Redis commands that failed, by operation.
    pub redis_errors: IntCounterVec,
    /// Redis Cluster: each node as this edge sees it (`roomcast_redis_node_up{node,role}`).
    pub redis_nodes: crate::bus::cluster::NodeBoard,
    /// `bus.min_replicas_acked`: a waited publish (script and WAIT) from sending to answer.
    pub redis_replication_seconds: prometheus::Histogram,
}

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace("roomcast"), labels).expect("valid metric");
    reg.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn fgauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help).namespace("roomcast"), labels).expect("valid metric");
    reg.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help).namespace("roomcast"), labels).expect("valid metric");
    reg.register(Box::new(g.clone())).expect("unique metric");
    g
}

/// A gauge family summed over its children.
fn gauge_sum(g: &IntGaugeVec) -> i64 {
    let mut total = 0;
    for mf in g.collect() {
        for m in mf.get_metric() {
            total += m.get_gauge().get_value() as i64;
        }
    }
    total
}

impl Metrics {
    /// Every family, registered in a fresh registry.
    ///
    /// # Panics
    ///
    /// If two families share a name or a help text is invalid: a bug the unit tests catch.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let s = &["shard"];
        let shard = ShardFamilies {
            connections: gauge(
                r,
                "connections",
                "Open connections (accepted, not yet closed), every transport: WebSocket, SSE, and requests not yet answered.",
                s,
            ),
            sse_connections: gauge(
                r,
                "sse_connections",
                "Open SSE streams (GET /sse answered 200, not yet closed); the rest of roomcast_connections is WebSocket or in handshake.",
                s,
            ),
            sse_refused: counter(
                r,
                "sse_refused_total",
                "GET /sse requests refused with an HTTP error (bad query or Last-Event-ID, token, origin, overload); also in handshake_failures_total.",
                s,
            ),
            accepted: counter(r, "connections_accepted_total", "TCP connections accepted.", s),
            closed: counter(
                r,
                "connections_closed_total",
                "Connections closed, by reason (peer_closed, peer_reset, handshake_timeout, handshake_refused, overloaded, idle_timeout, slow_consumer, replay_budget, recovery_unavailable, room_unavailable, protocol_error, token_expired, moderated, drain, shutdown, answered, tls_error, table_full: never held, the shard's descriptor table was full).",
                &["shard", "reason"],
            ),
            lingers: counter(
                r,
                "close_lingers_total",
                "Lingering closes: after a connection's last bytes (close frame, HTTP error, end of stream; over TLS then close_notify) the edge sends FIN and reads and discards what the peer still sends before closing, so that the close is not a reset. By outcome: fin (the peer closed: clean), timeout (ws.close_linger_ms ran out), bytes (the peer sent over 64 KiB more: cut), error (a reset or read error).",
                &["shard", "outcome"],
            ),
            handshake_failures: counter(
                r,
                "handshake_failures_total",
                "Upgrades refused with an HTTP error or timed out.",
                s,
            ),
            handshake_refusals: counter(
                r,
                "handshake_refusals_total",
                "Upgrades refused with an HTTP error or timed out, by status: the HTTP status answered (400 bad request, 401 token, 403 origin, 404 path, 426 version, 429 too many, 431 too large, 503 overloaded or draining), or timeout.",
                &["shard", "status"],
            ),
            protocol_errors: counter(
                r,
                "protocol_errors_total",
                "Connections closed for a WebSocket protocol violation (1002, 1007, 1009).",
                s,
            ),
            frames_written: counter(r, "frames_written_total", "WebSocket frames fully written to sockets.", s),
            bytes_written: counter(r, "bytes_written_total", "Bytes written to sockets.", s),
            messages_delivered: counter(
                r,
                "messages_delivered_total",
                "Published messages written to member sockets (one per message per member).",
                s,
            ),
            slow_consumer_closes: counter(
                r,
                "slow_consumer_closes_total",
                "Connections closed (4000) because their send queue passed its bound.",
                s,
            ),
            shed_bytes: counter(
                r,
                "shed_bytes_total",
                "Queued bytes of droppable messages dropped for connections that fell behind.",
                s,
            ),
            latency: {
                let opts = HistogramOpts::new(
                    "delivery_latency_seconds",
                    "What a member waits at this edge: from the arrival of the oldest message a frame carries at its room's batch (for frames carrying must-deliver messages, the oldest of those) to the completion of the frame's write to the member, so the merge window, the shard's queue and the socket (sampled 1 in 16), by class: frames carrying must-deliver messages, and droppable-only frames.",
                )
                .namespace("roomcast")
                .buckets(LATENCY_BUCKETS.to_vec());
                let h = HistogramVec::new(opts, &["shard", "class"]).expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            handshake: {
                let opts = HistogramOpts::new(
                    "handshake_seconds",
                    "From the accept of a WebSocket connection to the completion of the write of its 101 answer (the upgrade request's arrival, the shard's turn, and the answer's wait for a send), all shards. Clients give up an upgrade after their own timeout (10 s in roomcast's clients and load generator).",
                )
                .namespace("roomcast")
                .buckets(LATENCY_BUCKETS.to_vec());
                let h = Histogram::with_opts(opts).expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            latency_kind: {
                let opts = HistogramOpts::new(KIND_LATENCY.0, KIND_LATENCY.1)
                    .namespace("roomcast")
                    .buckets(LATENCY_BUCKETS.to_vec());
                HistogramVec::new(opts, &["shard", "kind"]).expect("valid metric")
            },
            frames_per_cpu_s: fgauge(
                r,
                "shard_frames_per_cpu_second",
                "Frames the shard writes per second of its thread's CPU time (EWMA): its measured capacity.",
                s,
            ),
            busy: fgauge(
                r,
                "shard_busy_ratio",
                "Share of wall time the shard's thread wanted the CPU: running, or runnable and waiting for a CPU (EWMA).",
                s,
            ),
            cpu_share: fgauge(
                r,
                "shard_cpu_share_ratio",
                "Share of the CPU the shard's thread got while it wanted to run (the rest went to other threads; EWMA).",
                s,
            ),
            send_errors: counter(r, "send_errors_total", "Sends that failed (peer reset, broken pipe).", s),
            rooms: gauge(r, "shard_rooms", "Rooms with at least one member on this shard.", s),
            send_queue_bytes: gauge(
                r,
                "send_queue_bytes",
                "Bytes queued for sending, all connections of the shard (sampled each tick).",
                s,
            ),
            accept_errors: counter(
                r,
                "accept_errors_total",
                "Accept completions with an error (ENFILE: the direct descriptor table was full, and the kernel closed the connection: also in connections_closed_total{reason=\"table_full\"}).",
                s,
            ),
            goaways: counter(r, "goaway_sent_total", "goaway messages sent while draining.", s),
            resets: counter(
                r,
                "join_resets_total",
                "Joins answered with a reset: the client's epoch was not the room's, or its since was ahead of the room.",
                s,
            ),
            refused: counter(
                r,
                "connections_refused_total",
                "Upgrades and signalling refused by the trust rules, by reason (token_missing, token_invalid, token_expired, origin, room_forbidden, banned, publish_forbidden, publish_too_large, refresh_other_user, ip_connections, ip_connect_rate).",
                &["shard", "reason"],
            ),
            moderated: counter(
                r,
                "moderated_connections_total",
                "Connections acted on by moderation, by action: kick (closed with 4002 by a disconnect) and ban (removed from a room the user was banned from).",
                &["shard", "action"],
            ),
            signals_refused: counter(
                r,
                "signals_refused_total",
                "Client signalling refused: over ws.signal_rate, a join over limits.max_rooms, or a malformed message (error bad_message or bad_room: a malformed epoch in a join among them).",
                s,
            ),
        };
        let bus = BusStats {
            messages_in: counter(r, "messages_in_total", "Messages accepted for publishing, by kind.", &["kind"]),
            messages_dropped: counter(
                r,
                "messages_dropped_total",
                "Messages dropped, by kind and reason.",
                &["kind", "reason"],
            ),
            batches: counter(
                r,
                "batches_total",
                "Merged batches flushed (each serialized once per encoding in use).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            batch_messages: counter(
                r,
                "batch_messages_total",
                "Messages flushed in batches (ratio to batches_total = merge factor).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            rooms: gauge(r, "rooms", "Rooms known to the engines (with members or a sequence).", &[])
                .with_label_values(&[] as &[&str]),
            publish_rejected: counter(r, "publish_rejected_total", "Publish requests refused, by reason.", &["reason"]),
            engine_busy: {
                let c = counter(
                    r,
                    "engine_busy_total",
                    "Publishes refused as engine_busy, by cause: upstream_full (the room engine's publish lane is full), output_backlog (its output for some shard is at its bound; higher for must-deliver kinds), redis_queue (too many publishes wait for Redis).",
                    &["cause"],
                );
                for cause in ["upstream_full", "output_backlog", "redis_queue"] {
                    c.with_label_values(&[cause]);
                }
                c
            },
            admin_refused: counter(
                r,
                "admin_refused_total",
                "Admin API requests refused, by reason: disabled (no admin_token), unauthorized (missing or wrong token), parameters (a query or body the endpoint does not take).",
                &["reason"],
            ),
            hot_window_seconds: fgauge(
                r,
                "hot_room_merge_window_seconds",
                "The widest merge window among the engine's hot rooms (publishing 5/s or more) now, from room size, measured capacity and the backlog rule; the configured window when none is hot. Updated every second.",
                &["engine"],
            ),
            sampling: gauge(
                r,
                "chat_sampling",
                "1 while some hot room of the engine has its droppable messages sampled down to the visible rate (by demand or by the backlog rule). Updated every second.",
                &["engine"],
            ),
            rooms_restored: counter(
                r,
                "rooms_restored_total",
                "Rooms read back from the store: their numbering and must-deliver history continue.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            publish_seconds: {
                let opts = HistogramOpts::new(
                    "publish_duration_seconds",
                    "Publish API requests from their arrival to their answer (a must-deliver message is answered once stored), by outcome: accepted (200) or refused (any other status) for one message, batch for POST /v1/messages (its messages refused are counted as single ones are: publish_rejected_total, or messages_dropped_total for rate limits and sampling).",
                )
                .namespace("roomcast")
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]);
                let h = HistogramVec::new(opts, &["outcome"]).expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            publish_replayed: counter(
                r,
                "publish_replayed_total",
                "Publishes answered with the seq of an earlier one carrying the same Idempotency-Key (nothing published again).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            recovery_reads: counter(
                r,
                "recovery_reads_total",
                "Redis mode: reads of Redis for joins whose since is older than this edge's history (one per room at a time, shared by every join waiting on it).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            recovery_joins: counter(
                r,
                "recovery_joins_total",
                "Redis mode: joins whose since was recovered from Redis (or, when Redis did not answer, sent back with 1013 to retry).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            store_bytes: gauge(
                r,
                "store_bytes",
                "Bytes the durable store uses on disk (store.max_bytes bounds it).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            store_renumbered: {
                let c = counter(
                    r,
                    "store_renumbered_total",
                    "Starts at which the store could not vouch for what is on disk, so that every room read back takes a new epoch (clients are reset), by reason: reboot (an unclean stop and a reboot under a lossy fsync policy), rollback (fewer durable batches than RUN's mark), copied (the data directory is a copy), unmarked (RUN missing).",
                    &["reason"],
                );
                for reason in ["reboot", "rollback", "copied", "unmarked"] {
                    let _ = c.with_label_values(&[reason]);
                }
                c
            },
            redis_errors: counter(
                r,
                "redis_errors_total",
                "Redis operations that failed, by operation (connect, connection_lost, subscribe, publish, fill, recover, sync, renumber, online, delete, moderation, topology).",
                &["op"],
            ),
            bus_shared: gauge(
                r,
                "bus_shared",
                "1 when the edge shares rooms through a bus (Redis), 0 for a single-node edge (bus_up is then 0 too).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            bus_up: gauge(
                r,
                "bus_up",
                "With a shared bus (Redis): 1 while it is reachable, 0 while not (publishes get 503). Absent value 0 without one.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            redis_replication_seconds: {
                let opts = HistogramOpts::new(
                    "redis_replicated_publish_seconds",
                    "With bus.min_replicas_acked: a must-deliver publish in Redis, script and WAIT for the replicas together (the cost of the replication promise).",
                )
                .namespace("roomcast")
                .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
                let h = prometheus::Histogram::with_opts(opts).expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            redis_nodes: crate::bus::cluster::NodeBoard::new(gauge(
                r,
                "redis_node_up",
                "Redis Cluster: 1 while this edge reaches the node (PING each second), 0 while not; one series per node and role (primary, replica).",
                &["node", "role"],
            )),
        };
        let draining =
            gauge(r, "draining", "1 while this edge drains (out of dispatch, not accepting, sending goaway).", &[])
                .with_label_values(&[] as &[&str]);
        let drain_held = gauge(
            r,
            "drain_held",
            "1 while a drain's goaways wait because no other edge takes members or too many are on their way (drain.pace).",
            &[],
        )
        .with_label_values(&[] as &[&str]);
        let drain_holds =
            counter(r, "drain_holds_total", "Times a drain's goaways began to wait for the fleet (drain.pace).", &[])
                .with_label_values(&[] as &[&str]);
        // The process's own figures (CPU seconds, resident memory, open descriptors and their
        // limit, threads, start time), read from /proc at each scrape.
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())).expect("unique metric");
        // Which build is running: a constant 1 with the version as a label (the Prometheus
        // convention for joining versions onto other series).
        gauge(r, "build_info", "The running build: always 1, its version in the labels.", &["version"])
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let perf = crate::perfcount::PerfFamilies::register(r);
        let moderation = crate::moderation::ModerationStats {
            actions: counter(
                r,
                "moderation_actions_total",
                "Moderation requests carried out by this edge's API, by action (disconnect, ban, unban, delete).",
                &["action"],
            ),
            refused: counter(
                r,
                "moderation_refused_total",
                "Moderation requests refused, by reason (no_key, bad_key, key_scope, key_room, bad_request, not_found, not_deletable, bans_full, bus_unavailable, store_unavailable, engine_busy, shutting_down).",
                &["reason"],
            ),
        };
        // Every series from the start: a rate over a series that appears at its first event
        // misses that event.
        for a in crate::moderation::ACTIONS {
            moderation.actions.with_label_values(&[a]);
        }
        for why in crate::moderation::REFUSALS {
            moderation.refused.with_label_values(&[why]);
        }
        let bans = gauge(r, "bans", "Moderation bans in force known to this edge (with Redis: every edge's).", &[])
            .with_label_values(&[] as &[&str]);
        let deflate = crate::deflate::DeflateStats::register(r);
        let tls_reloads = counter(
            r,
            "tls_reloads_total",
            "SIGHUP reloads of the TLS certificate and key, by outcome: ok, or failed (the edge keeps serving the old pair; the log says why).",
            &["outcome"],
        );
        Self {
            registry,
            shard,
            bus,
            draining,
            drain_held,
            drain_holds,
            perf,
            moderation,
            bans,
            deflate,
            tls_reloads,
            kinds: Vec::new(),
        }
    }

    /// The same, with per-kind delivery latency for `kinds` (`Config::latency_kinds`, in index
    /// order): each shard's handles, made by `shard`, have a series for every one of them from
    /// the start.
    pub fn with_kinds(mut self, kinds: Vec<String>) -> Self {
        self.kinds = kinds;
        self
    }

    /// The handles shard `id` increments.
    pub fn shard(&self, id: usize) -> ShardStats {
        let l = [id.to_string()];
        let l: [&str; 1] = [l[0].as_str()];
        let f = &self.shard;
        ShardStats {
            perf: self.perf.clone(),
            connections: f.connections.with_label_values(&l),
            sse_connections: f.sse_connections.with_label_values(&l),
            sse_refused: f.sse_refused.with_label_values(&l),
            accepted: f.accepted.with_label_values(&l),
            closed: ClosedBy(CloseWhy::ALL.iter().map(|w| f.closed.with_label_values(&[l[0], w.as_str()])).collect()),
            lingers: LingersBy(
                LingerEnd::ALL.iter().map(|e| f.lingers.with_label_values(&[l[0], e.as_str()])).collect(),
            ),
            handshake_failures: f.handshake_failures.with_label_values(&l),
            handshake_refusals: RefusalsBy { vec: f.handshake_refusals.clone(), shard: l[0].to_owned() },
            protocol_errors: f.protocol_errors.with_label_values(&l),
            frames_written: f.frames_written.with_label_values(&l),
            bytes_written: f.bytes_written.with_label_values(&l),
            messages_delivered: f.messages_delivered.with_label_values(&l),
            slow_consumer_closes: f.slow_consumer_closes.with_label_values(&l),
            shed_bytes: f.shed_bytes.with_label_values(&l),
            latency_must: f.latency.with_label_values(&[l[0], "must_deliver"]),
            latency_droppable: f.latency.with_label_values(&[l[0], "droppable"]),
            latency_kind: self.kinds.iter().map(|k| f.latency_kind.with_label_values(&[l[0], k.as_str()])).collect(),
            handshake_seconds: f.handshake.clone(),
            frames_per_cpu_s: f.frames_per_cpu_s.with_label_values(&l),
            busy: f.busy.with_label_values(&l),
            cpu_share: f.cpu_share.with_label_values(&l),
            send_errors: f.send_errors.with_label_values(&l),
            rooms: f.rooms.with_label_values(&l),
            send_queue_bytes: f.send_queue_bytes.with_label_values(&l),
            accept_errors: f.accept_errors.with_label_values(&l),
            goaways: f.goaways.with_label_values(&l),
            resets: f.resets.with_label_values(&l),
            signals_refused: f.signals_refused.with_label_values(&l),
            refused: f.refused.clone(),
            kicked: f.moderated.with_label_values(&[l[0], "kick"]),
            banned_out: f.moderated.with_label_values(&[l[0], "ban"]),
            deflate: self.deflate.clone(),
            shard_label: l[0].to_owned(),
        }
    }

    /// Total open connections over all shards.
    pub fn connections(&self) -> i64 {
        gauge_sum(&self.shard.connections)
    }

    /// Open SSE streams over all shards (a part of `connections`).
    pub fn sse_connections(&self) -> i64 {
        gauge_sum(&self.shard.sse_connections)
    }

    /// Frames and bytes written so far, all shards.
    pub fn written(&self) -> (u64, u64) {
        let sum = |c: &IntCounterVec| -> u64 {
            c.collect().iter().flat_map(|mf| mf.get_metric().iter().map(|m| m.get_counter().get_value() as u64)).sum()
        };
        (sum(&self.shard.frames_written), sum(&self.shard.bytes_written))
    }

    /// Delivery latency and capacity, for the dashboard: the histogram's bucket bounds and
    /// cumulative counts per class (all shards; a reader takes differences between two reads
    /// for a window), and each shard's capacity estimate.
    pub fn delivery(&self) -> serde_json::Value {
        let mut bounds: Vec<f64> = Vec::new();
        let mut classes: std::collections::BTreeMap<String, Vec<u64>> = std::collections::BTreeMap::new();
        for mf in self.shard.latency.collect() {
            for m in mf.get_metric() {
                let class = m.get_label().iter().find(|l| l.name() == "class").map_or("", |l| l.value()).to_owned();
                let buckets = m.get_histogram().get_bucket();
                if bounds.is_empty() {
                    bounds = buckets.iter().map(prometheus::proto::Bucket::upper_bound).collect();
                }
                let counts = classes.entry(class).or_insert_with(|| vec![0; buckets.len() + 1]);
                for (i, b) in buckets.iter().enumerate() {
                    counts[i] += b.cumulative_count();
                }
                counts[buckets.len()] += m.get_histogram().get_sample_count();
            }
        }
        let per_shard = |g: &GaugeVec| -> Vec<(String, f64)> {
            g.collect()
                .iter()
                .flat_map(|mf| {
                    mf.get_metric().iter().map(|m| {
                        let shard = m.get_label().first().map_or("", |l| l.value()).to_owned();
                        (shard, m.get_gauge().get_value())
                    })
                })
                .collect()
        };
        let busy: std::collections::HashMap<String, f64> = per_shard(&self.shard.busy).into_iter().collect();
        let mut shards: Vec<serde_json::Value> = per_shard(&self.shard.frames_per_cpu_s)
            .into_iter()
            .map(|(s, fps)| serde_json::json!({ "shard": s, "frames_per_cpu_s": fps, "busy": busy.get(&s).copied().unwrap_or(0.0) }))
            .collect();
        shards.sort_by_key(|v| v["shard"].as_str().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0));
        // Per kind, the same bounds: cumulative counts, then the sample count.
        let kinds: std::collections::BTreeMap<String, Vec<u64>> = self
            .kind_latency()
            .into_iter()
            .map(|(kind, h)| {
                let mut counts: Vec<u64> =
                    h.get_bucket().iter().map(prometheus::proto::Bucket::cumulative_count).collect();
                counts.push(h.get_sample_count());
                (kind, counts)
            })
            .collect();
        serde_json::json!({ "bounds_s": bounds, "cumulative": classes, "kinds": kinds, "shards": shards })
    }

    /// Each kind's delivery latency, summed over the shards.
    fn kind_latency(&self) -> std::collections::BTreeMap<String, proto::Histogram> {
        let mut kinds: std::collections::BTreeMap<String, proto::Histogram> = std::collections::BTreeMap::new();
        for mf in self.shard.latency_kind.collect() {
            for m in mf.get_metric() {
                let kind = m.get_label().iter().find(|l| l.name() == "kind").map_or("", |l| l.value());
                let h = m.get_histogram();
                let Some(sum) = kinds.get_mut(kind) else {
                    kinds.insert(kind.to_owned(), h.clone());
                    continue;
                };
                let mut buckets = sum.get_bucket().to_vec();
                for (b, add) in buckets.iter_mut().zip(h.get_bucket()) {
                    b.set_cumulative_count(b.cumulative_count() + add.cumulative_count());
                }
                sum.set_bucket(buckets);
                sum.set_sample_count(sum.get_sample_count() + h.get_sample_count());
                sum.set_sample_sum(sum.get_sample_sum() + h.get_sample_sum());
            }
        }
        kinds
    }

    /// `roomcast_delivery_latency_kind_seconds{kind}` (None before any shard made its series:
    /// a family without metrics would fail the whole exposition).
    fn kind_latency_family(&self) -> Option<MetricFamily> {
        let metrics: Vec<Metric> = self
            .kind_latency()
            .into_iter()
            .map(|(kind, h)| {
                let mut m = Metric::from_label(labels(&[("kind", &kind)]));
                m.set_histogram(h);
                m
            })
            .collect();
        (!metrics.is_empty()).then(|| family(KIND_LATENCY.0, KIND_LATENCY.1, MetricType::HISTOGRAM, metrics))
    }

    /// Cumulative counters and current gauges the dashboard and `edge top` turn into rates: the
    /// edge's own families summed over shards (and split by `reason` where they have one).
    pub fn totals(&self) -> serde_json::Value {
        use std::collections::BTreeMap;
        let (mut sums, mut reasons): (BTreeMap<String, f64>, BTreeMap<String, BTreeMap<String, f64>>) =
            (BTreeMap::new(), BTreeMap::new());
        for mf in self.registry.gather() {
            let name = mf.name().strip_prefix("roomcast_").unwrap_or(mf.name()).to_owned();
            let value = |m: &Metric| match mf.get_field_type() {
                MetricType::COUNTER => m.get_counter().get_value(),
                MetricType::GAUGE => m.get_gauge().get_value(),
                _ => 0.0,
            };
            for m in mf.get_metric() {
                let v = value(m);
                *sums.entry(name.clone()).or_default() += v;
                if let Some(r) = m.get_label().iter().find(|l| l.name() == "reason") {
                    *reasons.entry(name.clone()).or_default().entry(r.value().to_owned()).or_default() += v;
                }
            }
        }
        let pick = |n: &str| sums.get(n).copied().unwrap_or(0.0);
        serde_json::json!({
            "messages_in": pick("messages_in_total"),
            "messages_delivered": pick("messages_delivered_total"),
            "frames_written": pick("frames_written_total"),
            "bytes_written": pick("bytes_written_total"),
            "goaways": pick("goaway_sent_total"),
            "slow_consumer_closes": pick("slow_consumer_closes_total"),
            "rooms": pick("rooms"),
            "publish_rejected": reasons.get("publish_rejected_total").cloned().unwrap_or_default(),
            "messages_dropped": reasons.get("messages_dropped_total").cloned().unwrap_or_default(),
            "connections_refused": reasons.get("connections_refused_total").cloned().unwrap_or_default(),
        })
    }

    /// The registry every family is in (for families made elsewhere, such as dispatch's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every family, the kernel probes' after the edge's.
    /// `health`: the edge's health as a whole (the kernel policy's, with the store and the bus).
    /// `cert`: the TLS leaf's dates (`roomcast_tls_cert_expiry_seconds`; None: no TLS).
    pub fn render(
        &self,
        kernel: &KernelView,
        health: &HealthReport,
        cert: Option<&crate::tls::Validity>,
        out: &mut String,
    ) {
        let mut families = self.registry.gather();
        families.extend(self.kind_latency_family());
        families.extend(kernel_families(kernel.snapshot().as_deref(), health));
        families.extend(cert.map(|v| tls_cert_family(v, crate::tls::unix_now())));
        let mut buf = Vec::new();
        // Encoding well-formed families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&families, &mut buf);
        out.push_str(&String::from_utf8_lossy(&buf));
    }
}

/// `roomcast_tls_cert_expiry_seconds`: computed at each scrape, so it counts down between
/// reloads and follows the file a SIGHUP loaded.
fn tls_cert_family(v: &crate::tls::Validity, now: i64) -> MetricFamily {
    family(
        "tls_cert_expiry_seconds",
        "Seconds until the TLS leaf certificate's notAfter (negative once expired), for the file labelled; follows SIGHUP reloads. Alert well before 0: at 0 every new wss handshake fails.",
        MetricType::GAUGE,
        vec![gauge_m(&[("cert", &v.cert)], v.expires_in_s(now) as f64)],
    )
}

fn family(name: &str, help: &str, ty: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(format!("roomcast_{name}"));
    f.set_help(help.to_owned());
    f.set_field_type(ty);
    *f.mut_metric() = metrics;
    f
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

fn gauge_m(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut g = proto::Gauge::default();
    g.set_value(v);
    let mut m = Metric::from_label(labels(pairs));
    m.set_gauge(g);
    m
}

fn counter_m(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut c = proto::Counter::default();
    c.set_value(v);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn histogram_m(q: &QueueStats) -> Metric {
    let mut h = proto::Histogram::default();
    let mut cumulative = 0;
    let mut buckets = Vec::new();
    for (i, n) in q.buckets.iter().enumerate() {
        cumulative += n;
        // The last bucket is unbounded: it is the +Inf line the encoder adds from the count.
        if let Some(le) = QueueStats::upper_bound(i) {
            let mut b = proto::Bucket::default();
            b.set_upper_bound(le as f64);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
    }
    h.set_bucket(buckets);
    h.set_sample_count(cumulative);
    h.set_sample_sum(q.sum as f64);
    let mut m = Metric::default();
    m.set_histogram(h);
    m
}

/// The kernel probes' families (all present, empty when there is no snapshot, so dashboards
/// see the names).
pub fn kernel_families(snap: Option<&Snapshot>, report: &HealthReport) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};
    let mut out = Vec::new();
    let source = snap.map(|s| s.source.as_str()).or(report.source).unwrap_or("none");
    out.push(family(
        "probe_info",
        "Where the kernel figures come from: ebpf (iter/tcp + tracepoints), sock_diag (netlink + /proc), none.",
        GAUGE,
        vec![gauge_m(&[("source", source)], 1.0)],
    ));
    let status = crate::health::level_name(report.status);
    out.push(family(
        "health",
        "The health policy's state (1 on the current one): ok, degraded, overloaded.",
        GAUGE,
        ["ok", "degraded", "overloaded"]
            .iter()
            .map(|s| gauge_m(&[("state", s)], f64::from(u8::from(*s == status))))
            .collect(),
    ));
    let Some(s) = snap else { return out };
    let first_kernel_family = out.len();
    out.push(family(
        "probe_scan_seconds",
        "How long the last look at the kernel took.",
        GAUGE,
        vec![gauge_m(&[], s.scan_us as f64 / 1e6)],
    ));
    out.push(family(
        "tcp_sockets",
        "TCP sockets on the edge's port, by state (ss names; close_wait: peer gone, edge not closed yet).",
        GAUGE,
        s.states_by_name().map(|(name, n)| gauge_m(&[("state", name)], n as f64)).collect(),
    ));
    out.push(family(
        "tcp_send_queue_bytes",
        "Send-Q (write_seq - snd_una) of the edge's connected sockets: bytes sent but not acknowledged.",
        HISTOGRAM,
        vec![histogram_m(&s.send_queue)],
    ));
    out.push(family(
        "tcp_recv_queue_bytes",
        "Recv-Q (rcv_nxt - copied_seq) of the edge's connected sockets: bytes received but not read.",
        HISTOGRAM,
        vec![histogram_m(&s.recv_queue)],
    ));
    out.push(family(
        "tcp_send_queue_max_bytes",
        "The largest Send-Q of any of the edge's sockets.",
        GAUGE,
        vec![gauge_m(&[], s.send_queue.max as f64)],
    ));
    out.push(family(
        "tcp_recv_queue_max_bytes",
        "The largest Recv-Q of any of the edge's sockets.",
        GAUGE,
        vec![gauge_m(&[], s.recv_queue.max as f64)],
    ));
    let ports: Vec<String> = s.listeners.iter().map(|l| l.port.to_string()).collect();
    out.push(family(
        "listen_backlog",
        "Connections completed but not yet accepted, per listening port (sum over SO_REUSEPORT listeners).",
        GAUGE,
        s.listeners.iter().zip(&ports).map(|(l, p)| gauge_m(&[("port", p)], l.backlog as f64)).collect(),
    ));
    out.push(family(
        "listen_backlog_max",
        "The accept queues' limit per listening port (sum over SO_REUSEPORT listeners).",
        GAUGE,
        s.listeners.iter().zip(&ports).map(|(l, p)| gauge_m(&[("port", p)], l.backlog_max as f64)).collect(),
    ));
    out.push(family(
        "listen_backlog_fullest_ratio",
        "The fullest single listener's accept queue over its limit, per port (one per shard: a shard not accepting shows here).",
        GAUGE,
        s.listeners
            .iter()
            .zip(&ports)
            .map(|(l, p)| gauge_m(&[("port", p)], if l.fullest_max > 0 { l.fullest as f64 / l.fullest_max as f64 } else { 0.0 }))
            .collect(),
    ));
    out.push(family(
        "listen_overflows_total",
        "TcpExt ListenOverflows of the network namespace: handshakes dropped on a full accept queue.",
        COUNTER,
        vec![counter_m(&[], s.listen_overflows as f64)],
    ));
    out.push(family(
        "listen_drops_total",
        "TcpExt ListenDrops of the network namespace: SYNs a listener dropped for any reason.",
        COUNTER,
        vec![counter_m(&[], s.listen_drops as f64)],
    ));
    out.push(family(
        "tcp_retransmits_total",
        "Segments retransmitted on the edge's sockets since the probes started.",
        COUNTER,
        vec![counter_m(&[], s.retransmits as f64)],
    ));
    // The worst peers by retransmits are on /v1/kernel and the dashboard, not here: a peer
    // label is a new series for every client that ever ranked (unbounded over time) and puts
    // client addresses into every scrape.
    for (name, help, v) in [
        (
            "tcp_synack_retransmits_total",
            "SYN-ACKs retransmitted by the edge's listeners (eBPF source only).",
            s.synack_retransmits,
        ),
        ("tcp_opened_total", "Connections to the edge's port that reached ESTABLISHED (eBPF source only).", s.opened),
        ("tcp_closed_total", "Connections on the edge's port that reached CLOSE (eBPF source only).", s.closed),
        (
            "tcp_close_wait_entered_total",
            "Transitions into CLOSE_WAIT on the edge's port (eBPF source only).",
            s.close_wait_entered,
        ),
    ] {
        if let Some(v) = v {
            out.push(family(name, help, COUNTER, vec![counter_m(&[], v as f64)]));
        }
    }
    // Every kernel figure says where it came from (the sources differ in detail: retransmits
    // are counted as they happen with eBPF, from live sockets with sock_diag).
    for f in &mut out[first_kernel_family..] {
        for m in f.mut_metric() {
            let mut l = labels(&[("source", s.source.as_str())]);
            l.extend(m.take_label());
            m.set_label(l);
        }
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    /// Each lingering outcome has its series from the start, and counts in its own.
    #[test]
    fn lingering_closes_are_counted_by_outcome() {
        use super::LingerEnd;
        use prometheus::Encoder as _;
        for (i, e) in LingerEnd::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i, "ALL is in declaration order");
        }
        let m = Metrics::new();
        let s = m.shard(0);
        s.lingers.inc(LingerEnd::Fin);
        s.lingers.inc(LingerEnd::Fin);
        s.lingers.inc(LingerEnd::Bytes);
        let mut buf = Vec::new();
        prometheus::TextEncoder::new().encode(&m.registry().gather(), &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        for (outcome, n) in [("fin", 2), ("timeout", 0), ("bytes", 1), ("error", 0)] {
            let line = format!("roomcast_close_lingers_total{{outcome=\"{outcome}\",shard=\"0\"}} {n}");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
    }

    /// Per-kind latency is one series per kind, edge-wide: each shard observes into its own
    /// children and a scrape sums them, with no shard label; every kind has its series from the
    /// start; the dashboard's source has the same counts.
    #[test]
    fn kind_latency_is_summed_over_shards_into_one_series_per_kind() {
        let m = Metrics::new().with_kinds(vec!["chat".into(), "gift".into(), "deleted".into()]);
        let (a, b) = (m.shard(0), m.shard(1));
        a.latency_kind[1].observe(0.25);
        b.latency_kind[1].observe(1.25);
        b.latency_kind[0].observe(0.004);
        let view = crate::health::KernelView::new(std::sync::Arc::default(), false);
        let render = |m: &Metrics| {
            let mut text = String::new();
            m.render(&view, &view.report(), None, &mut text);
            text
        };
        let text = render(&m);
        let line = |prefix: &str| {
            text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}")).to_owned()
        };
        assert_eq!(
            line("roomcast_delivery_latency_kind_seconds_count{kind=\"gift\"}"),
            "roomcast_delivery_latency_kind_seconds_count{kind=\"gift\"} 2"
        );
        assert_eq!(
            line("roomcast_delivery_latency_kind_seconds_sum{kind=\"gift\"}"),
            "roomcast_delivery_latency_kind_seconds_sum{kind=\"gift\"} 1.5"
        );
        assert!(line("roomcast_delivery_latency_kind_seconds_bucket{kind=\"gift\",le=\"0.5\"}").ends_with(" 1"));
        assert!(line("roomcast_delivery_latency_kind_seconds_count{kind=\"chat\"}").ends_with(" 1"));
        assert!(line("roomcast_delivery_latency_kind_seconds_count{kind=\"deleted\"}").ends_with(" 0"));
        assert!(!text.lines().any(|l| l.starts_with("roomcast_delivery_latency_kind_seconds") && l.contains("shard=")));
        assert_eq!(text.matches("# TYPE roomcast_delivery_latency_kind_seconds histogram").count(), 1);
        let d = m.delivery();
        let gift = d["kinds"]["gift"].as_array().unwrap();
        assert_eq!(gift.len(), d["bounds_s"].as_array().unwrap().len() + 1);
        assert_eq!(gift.last().unwrap(), 2);
        // No kinds (a registry for tests): no family, and the exposition is still whole.
        let bare = Metrics::new();
        let _ = bare.shard(0);
        let text = render(&bare);
        assert!(!text.contains("delivery_latency_kind") && text.contains("roomcast_build_info"));
    }
}
