//! Counters for /metrics (Prometheus text format, via the `prometheus` crate).
//!
//! Each shard gets its own labelled child of every family up front and increments it alone, so
//! the hot path does relaxed atomic adds on cache lines no other core writes. A scrape reads
//! them all; the kernel probes append their own families after.

use prometheus::core::Collector;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// Every family the edge exports.
pub struct Metrics {
    registry: Registry,
    shard: ShardFamilies,
    pub bus: BusStats,
    /// 1 while the edge drains.
    pub draining: IntGauge,
}

struct ShardFamilies {
    connections: IntGaugeVec,
    accepted: IntCounterVec,
    closed: IntCounterVec,
    handshake_failures: IntCounterVec,
    protocol_errors: IntCounterVec,
    frames_written: IntCounterVec,
    bytes_written: IntCounterVec,
    messages_delivered: IntCounterVec,
    slow_consumer_closes: IntCounterVec,
    shed_bytes: IntCounterVec,
    send_errors: IntCounterVec,
    rooms: IntGaugeVec,
    send_queue_bytes: IntGaugeVec,
    accept_errors: IntCounterVec,
    goaways: IntCounterVec,
}

/// One shard's handles (cheap clones of the shared atomics).
#[derive(Clone)]
pub struct ShardStats {
    pub connections: IntGauge,
    pub accepted: IntCounter,
    pub closed: IntCounter,
    pub handshake_failures: IntCounter,
    pub protocol_errors: IntCounter,
    pub frames_written: IntCounter,
    pub bytes_written: IntCounter,
    pub messages_delivered: IntCounter,
    pub slow_consumer_closes: IntCounter,
    pub shed_bytes: IntCounter,
    pub send_errors: IntCounter,
    pub rooms: IntGauge,
    pub send_queue_bytes: IntGauge,
    pub accept_errors: IntCounter,
    pub goaways: IntCounter,
}

/// The bus thread's figures (and the publish API's).
#[derive(Clone)]
pub struct BusStats {
    pub messages_in: IntCounterVec,
    pub messages_dropped: IntCounterVec,
    pub batches: IntCounter,
    pub batch_messages: IntCounter,
    pub rooms: IntGauge,
    pub publish_rejected: IntCounterVec,
    pub hot_window_ms: IntGauge,
    pub sampling: IntGauge,
}

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace("roomcast"), labels).expect("valid metric");
    reg.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help).namespace("roomcast"), labels).expect("valid metric");
    reg.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let s = &["shard"];
        let shard = ShardFamilies {
            connections: gauge(r, "connections", "Open WebSocket connections (accepted, not yet closed).", s),
            accepted: counter(r, "connections_accepted_total", "TCP connections accepted.", s),
            closed: counter(r, "connections_closed_total", "Connections closed, for any reason.", s),
            handshake_failures: counter(
                r,
                "handshake_failures_total",
                "Upgrades refused with an HTTP error or timed out.",
                s,
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
                "Accept completions with an error (ENFILE: direct descriptor table full).",
                s,
            ),
            goaways: counter(r, "goaway_sent_total", "goaway messages sent while draining.", s),
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
            rooms: gauge(r, "rooms", "Rooms known to the bus (with members or a sequence).", &[])
                .with_label_values(&[] as &[&str]),
            publish_rejected: counter(r, "publish_rejected_total", "Publish requests refused, by reason.", &["reason"]),
            hot_window_ms: gauge(
                r,
                "hot_room_merge_window_ms",
                "Merge window hot rooms use now (adaptive: widened while shards are behind).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            sampling: gauge(
                r,
                "chat_sampling",
                "1 while hot rooms' droppable messages are sampled down to the visible rate.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
        };
        let draining =
            gauge(r, "draining", "1 while this edge drains (out of dispatch, not accepting, sending goaway).", &[])
                .with_label_values(&[] as &[&str]);
        Self { registry, shard, bus, draining }
    }

    /// The handles shard `id` increments.
    pub fn shard(&self, id: usize) -> ShardStats {
        let l = [id.to_string()];
        let l: [&str; 1] = [l[0].as_str()];
        let f = &self.shard;
        ShardStats {
            connections: f.connections.with_label_values(&l),
            accepted: f.accepted.with_label_values(&l),
            closed: f.closed.with_label_values(&l),
            handshake_failures: f.handshake_failures.with_label_values(&l),
            protocol_errors: f.protocol_errors.with_label_values(&l),
            frames_written: f.frames_written.with_label_values(&l),
            bytes_written: f.bytes_written.with_label_values(&l),
            messages_delivered: f.messages_delivered.with_label_values(&l),
            slow_consumer_closes: f.slow_consumer_closes.with_label_values(&l),
            shed_bytes: f.shed_bytes.with_label_values(&l),
            send_errors: f.send_errors.with_label_values(&l),
            rooms: f.rooms.with_label_values(&l),
            send_queue_bytes: f.send_queue_bytes.with_label_values(&l),
            accept_errors: f.accept_errors.with_label_values(&l),
            goaways: f.goaways.with_label_values(&l),
        }
    }

    /// Total open connections over all shards.
    pub fn connections(&self) -> i64 {
        let mut total = 0;
        for mf in self.shard.connections.collect() {
            for m in mf.get_metric() {
                total += m.get_gauge().get_value() as i64;
            }
        }
        total
    }

    /// Frames and bytes written so far, all shards.
    pub fn written(&self) -> (u64, u64) {
        let sum = |c: &IntCounterVec| -> u64 {
            c.collect().iter().flat_map(|mf| mf.get_metric().iter().map(|m| m.get_counter().get_value() as u64)).sum()
        };
        (sum(&self.shard.frames_written), sum(&self.shard.bytes_written))
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self, out: &mut String) {
        let mut buf = Vec::new();
        // Encoding our own registry into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        out.push_str(&String::from_utf8_lossy(&buf));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
