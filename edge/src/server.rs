//! Starts and stops an edge: shard threads (each with its room engine), publish API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bus::redis::StreamLimits;
use crate::bus::{BusHandle, Mail, Mailbox, ShardCmd};
use crate::config::{Config, Placement};
use crate::engine::host::BesideSpec;
use crate::engine::{Engine, EngineConfig, LoadBoard};
use crate::health::{KernelView, Monitor};
use crate::metrics::Metrics;
use crate::shard::{self, ShardSpec};

/// Descriptors of the direct-descriptor table kept free of connections, per shard.
const RESERVED_SLOTS: u64 = 16;
/// Mails a shard's mailbox holds. A shard drains it completely every turn and each peer sends
/// at most one mail per turn, so this is reached only when a shard is stuck, or when the
/// publish API offers more than an engine turn can take: publishes then get 503 + Retry-After.
const MAILBOX_CAPACITY: usize = 8192;
/// Each mailbox's upstream lane (the publish API's publishes and deletes): publishes waiting
/// for one engine beyond this are refused as busy (503, Retry-After).
const UPSTREAM_CAPACITY: usize = 4096;

/// A running edge's data plane (shards + bus). The publish API runs on the caller's runtime.
pub struct Edge {
    /// Where the WebSocket listener is bound (the actual port when 0 was asked).
    pub ws_addr: SocketAddr,
    /// Handle to the bus: publish, moderate and query rooms from outside the shards.
    pub bus: BusHandle,
    /// The edge's Prometheus registry and its counters.
    pub metrics: Arc<Metrics>,
    /// Number of shard threads.
    pub shards: usize,
    /// Connections this edge can hold (shards x direct-descriptor table).
    pub capacity: u64,
    /// When the edge started, for uptime.
    pub started: Instant,
    /// The kernel probes' latest figures and the health policy's verdict.
    pub kernel: Arc<KernelView>,
    monitor: Monitor,
    mailboxes: Vec<Mailbox>,
    /// Engines on threads of their own (`engine.placement = "beside"`), else empty.
    engine_mailboxes: Vec<Mailbox>,
    shard_threads: Vec<JoinHandle<()>>,
    engine_threads: Vec<JoinHandle<()>>,
    /// Ends once every engine is gone and the last records are durable.
    store_thread: Option<JoinHandle<()>>,
    /// The single-node store (None: Redis mode or `--no-store`).
    pub store: Option<Arc<crate::store::Store>>,
    /// Moderation: bans, and the way to the shards' connections.
    pub moderation: Arc<crate::moderation::Moderation>,
    /// `[tls]`: the shards' TLS (reload it on SIGHUP: [`crate::tls::Tls::reload`]); None: ws.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The shards' measured capacity and load, as the engines' latency controller sees them.
    pub load: Arc<LoadBoard>,
}

impl Edge {
    /// Binds the WebSocket port on every shard and starts the threads. Fails with a clear error
    /// when the kernel lacks a needed io_uring feature.
    pub fn start(cfg: Arc<Config>, rt: &tokio::runtime::Handle) -> anyhow::Result<Self> {
        let nofile = crate::sys::raise_nofile().unwrap_or(1024);
        let n = cfg.shard_count();
        let table = if cfg.ws.max_connections_per_shard == 0 {
            nofile
        } else {
            u64::from(cfg.ws.max_connections_per_shard).min(nofile)
        };
        let max_conns = u32::try_from(table.max(RESERVED_SLOTS * 2)).unwrap_or(u32::MAX);
        let cpus = crate::sys::allowed_cpus();
        let tls = match &cfg.tls {
            Some(files) => {
                let tls = crate::tls::Tls::load(files)?;
                // Which path encrypts: the kernel (kTLS) or each shard in user space.
                tracing::info!(cert = %files.cert.display(), "TLS (wss) on the WebSocket listener: {}", crate::tls::probe_ktls());
                // An expired or nearly expired leaf is a WARN, not a refusal (ARCHITECTURE.md).
                tls.log_validity("start");
                Some(Arc::new(tls))
            }
            None => None,
        };

        // The kernel caps every listener's backlog at net.core.somaxconn (per network
        // namespace) without a word: a configured backlog above it is not the one in force.
        if let Some(cap) = crate::sys::somaxconn()
            && i64::from(cfg.ws.backlog) > cap
        {
            tracing::warn!(
                backlog = cfg.ws.backlog,
                somaxconn = cap,
                "ws.backlog is above net.core.somaxconn: each shard's accept queue holds {cap}; raise net.core.somaxconn to {} for the configured depth",
                cfg.ws.backlog
            );
        }
        // Another process on the port would silently get part of the new connections.
        if let Some(held) = crate::listen_guard::check_port(cfg.listen, cfg.takeover)? {
            tracing::warn!(
                port = cfg.listen.port(),
                holders = %held,
                "taking over the port: new connections are shared with the holder until it stops"
            );
        }
        // The first listener picks the port when 0 is asked for; the others share it.
        let first = crate::sys::listener(
            cfg.listen,
            cfg.ws.backlog,
            cfg.send.socket_send_buffer,
            cfg.send.socket_notsent_lowat,
            Some(std::time::Duration::from_millis(cfg.ws.idle_timeout_ms)),
        )
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (listen): {e}", cfg.listen))?;
        let ws_addr =
            first.local_addr()?.as_socket().ok_or_else(|| anyhow::anyhow!("listen address is not an inet address"))?;
        let mut listeners = vec![first];
        for _ in 1..n {
            listeners.push(
                crate::sys::listener(
                    ws_addr,
                    cfg.ws.backlog,
                    cfg.send.socket_send_buffer,
                    cfg.send.socket_notsent_lowat,
                    Some(std::time::Duration::from_millis(cfg.ws.idle_timeout_ms)),
                )
                .map_err(|e| anyhow::anyhow!("cannot listen on {ws_addr} (listen): {e}"))?,
            );
        }

        let metrics = Arc::new(Metrics::new().with_kinds(cfg.latency_kinds()));
        let health = Arc::new(AtomicU8::new(crate::dispatch::EdgeHealth::Ok.level()));
        // One mailbox per shard; the shard's engine reads the same one.
        let mut mailboxes = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..n {
            let doorbell = Arc::new(crate::sys::eventfd()?);
            let parked = Arc::new(AtomicBool::new(false));
            let (mailbox, inbox) = Mailbox::pair(MAILBOX_CAPACITY, UPSTREAM_CAPACITY, doorbell.clone(), parked.clone());
            mailboxes.push(mailbox);
            receivers.push((inbox, doorbell, parked));
        }
        let beside = cfg.engine.placement == Placement::Beside;
        // Beside: each engine gets a mailbox of its own (no doorbell: its thread blocks on the
        // channel). Hosted: engine i reads shard i's mailbox.
        let mut engine_rx = Vec::new();
        let engine_mailboxes = if beside {
            let mut v = Vec::new();
            for _ in 0..n {
                let doorbell = Arc::new(crate::sys::eventfd()?);
                let (mailbox, inbox) =
                    Mailbox::pair(MAILBOX_CAPACITY, UPSTREAM_CAPACITY, doorbell, Arc::new(AtomicBool::new(false)));
                v.push(mailbox);
                engine_rx.push(inbox);
            }
            v
        } else {
            mailboxes.clone()
        };
        let busy = metrics.bus.publish_rejected.with_label_values(&["engine_busy"]);
        let lane_full = metrics.bus.engine_busy.with_label_values(&["upstream_full"]);
        let bus = BusHandle::new(engine_mailboxes.clone(), busy, lane_full);
        // The durable store: single-node mode only (in Redis mode, Redis with AOF is the
        // authority for numbering and history; a local copy could only disagree with it).
        let mut store_handles = Vec::new();
        let mut store_ref = None;
        let store_thread = if cfg.bus.is_none() && cfg.store.enabled {
            let store = crate::store::Store::open(&cfg.data_dir, &cfg.store)
                .map_err(|e| anyhow::anyhow!("data_dir {}: {e}", cfg.data_dir.display()))?;
            store_ref = Some(store.clone());
            if let Some(d) = store.distrust() {
                metrics.bus.store_renumbered.with_label_values(&[d.label()]).inc();
            }
            tracing::info!(dir = %cfg.data_dir.display(), fsync = ?cfg.store.fsync, bytes = store.bytes(), "store open");
            let max_age = std::time::Duration::from_millis(cfg.history.max_age_ms);
            let (handles, h) = store.start(engine_mailboxes.clone(), max_age, metrics.bus.store_bytes.clone())?;
            store_handles = handles;
            Some(h)
        } else {
            if cfg.bus.is_none() {
                tracing::warn!("store off: a restart gives every room a new epoch (clients are told with reset)");
            }
            None
        };
        // Moderation: the bans the shards read at joins, and the way to the shards' connections.
        let bans = Arc::new(crate::moderation::Bans::new(cfg.moderation.max_bans, Some(metrics.bans.clone())));
        let moderation = Arc::new(crate::moderation::Moderation::new(
            bans,
            mailboxes.clone(),
            store_ref.clone(),
            metrics.moderation.clone(),
        ));
        moderation.load_stored(crate::bus::now_us() / 1000);
        let bridge = match &cfg.bus {
            Some(bus_cfg) => {
                let url = &bus_cfg.url;
                let _guard = rt.enter();
                let limits = StreamLimits {
                    must_deliver: cfg.history.must_deliver,
                    droppable: cfg.history.droppable,
                    idempotency_ttl_s: cfg.ingest.idempotency_ttl_s,
                    min_replicas_acked: bus_cfg.min_replicas_acked,
                    replicas_timeout_ms: bus_cfg.replicas_timeout_ms,
                };
                let presence = crate::bus::redis::Presence {
                    edge_id: cfg.edge_name(ws_addr),
                    ttl: Duration::from_millis(cfg.presence.ttl_ms),
                };
                let bridge = crate::bus::redis::start(
                    url,
                    bus.clone(),
                    limits,
                    presence,
                    metrics.bus.bus_up.clone(),
                    metrics.bus.redis_errors.clone(),
                    moderation.clone(),
                    metrics.bus.redis_nodes.clone(),
                    metrics.bus.redis_replication_seconds.clone(),
                )
                .map_err(|e| anyhow::anyhow!("bus: cannot use {}: {e}", crate::config::redact_url(url)))?;
                tracing::info!(url = %crate::config::redact_url(url), "shared bus: redis");
                metrics.bus.bus_shared.set(1);
                Some(bridge)
            }
            None => None,
        };
        let mut store_handles = store_handles.into_iter();
        let engine_cfg = EngineConfig::from_config(&cfg);
        for e in 0..n {
            let e = e.to_string();
            metrics
                .bus
                .hot_window_seconds
                .with_label_values(&[e.as_str()])
                .set(cfg.fanout.merge_window_ms as f64 / 1000.0);
            metrics.bus.sampling.with_label_values(&[e.as_str()]).set(0);
        }
        let parallel = std::thread::available_parallelism().map_or(n, std::num::NonZeroUsize::get);
        let load = Arc::new(LoadBoard::new(n).with_cpus(parallel));
        let (now, wall) = (Instant::now(), crate::bus::now_us());
        let ipguard = crate::ipguard::IpGuard::new(&cfg.limits).map(Arc::new);
        let auth = crate::auth::Verifier::from_config(&cfg.auth, std::env::var("ROOMCAST_AUTH_SECRET").ok())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map(Arc::new);
        if auth.is_none() {
            tracing::warn!(
                "auth is off: connections get anonymous ids and may publish only client kinds \
                 (set auth.hs256_secret, ROOMCAST_AUTH_SECRET or auth.keys to require tokens)"
            );
        }
        let cpu_of = |i: usize| if cfg.pin { cpus.get(i % cpus.len().max(1)).copied() } else { None };
        let mut engines = Vec::new();
        for i in 0..n {
            let mut engine =
                Engine::new(i as u16, n, n, engine_cfg.clone(), metrics.bus.clone(), load.clone(), now, wall);
            if let Some(b) = &bridge {
                engine = engine.with_remote(b.clone());
            }
            if let Some(h) = store_handles.next() {
                engine = engine.with_store(h);
            }
            engines.push(engine);
        }
        let mut engine_threads = Vec::new();
        if beside {
            for (i, (engine, rx)) in engines.drain(..).zip(engine_rx).enumerate() {
                let spec = BesideSpec { engine, mailbox: rx, shards: mailboxes.clone(), cpu: cpu_of(i) };
                engine_threads.push(
                    std::thread::Builder::new()
                        .name(format!("roomcast-engine-{i}"))
                        .spawn(move || crate::engine::host::run_beside(spec))?,
                );
            }
        }
        tracing::info!(engines = n, placement = ?cfg.engine.placement, "room engines");
        let mut engines = engines.into_iter();
        let mut specs = Vec::new();
        for (i, (listener, (rx, doorbell, parked))) in listeners.into_iter().zip(receivers).enumerate() {
            specs.push(ShardSpec {
                id: i as u16,
                cpu: cpu_of(i),
                listener,
                cfg: cfg.clone(),
                engine: engines.next(),
                engines: engine_mailboxes.clone(),
                load: load.clone(),
                mailbox: rx,
                doorbell,
                parked,
                stats: metrics.shard(i),
                max_conns,
                health: health.clone(),
                refuse_when_overloaded: cfg.health.refuse_when_overloaded,
                auth: auth.clone(),
                ipguard: ipguard.clone(),
                bans: moderation.bans.clone(),
                tls: tls.as_ref().map(|t| t.config.clone()),
            });
        }

        let mut shard_threads = Vec::new();
        for spec in specs {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let id = spec.id;
            let cpu = spec.cpu;
            let h = std::thread::Builder::new()
                .name(format!("roomcast-shard-{id}"))
                .spawn(move || shard::run(spec, ready_tx))?;
            match ready_rx.recv() {
                Ok(Ok(())) => {
                    if let Some(cpu) = cpu {
                        tracing::info!(shard = id, cpu, max_conns, "shard ready");
                    } else {
                        tracing::info!(shard = id, cpu = "unpinned", max_conns, "shard ready");
                    }
                }
                Ok(Err(e)) => return Err(anyhow::anyhow!("shard {id} cannot start: {e}")),
                Err(_) => return Err(anyhow::anyhow!("shard {id} died during start-up")),
            }
            shard_threads.push(h);
        }
        // The probes watch the WebSocket port: the sockets of the members, and its listeners.
        let monitor = Monitor::start(cfg.probes.clone(), cfg.health.clone(), vec![ws_addr.port()], health);
        Ok(Self {
            ws_addr,
            bus,
            metrics,
            capacity: u64::from(max_conns) * n as u64,
            shards: n,
            started: Instant::now(),
            kernel: monitor.view.clone(),
            monitor,
            mailboxes,
            engine_mailboxes: if beside { engine_mailboxes } else { Vec::new() },
            shard_threads,
            engine_threads,
            store_thread,
            store: store_ref,
            moderation,
            tls,
            load,
        })
    }

    /// Starts a drain on every shard: stop accepting, spread `goaway` over `period_ms`.
    pub fn drain(&self, url: &str, period_ms: u64) {
        let url: Arc<str> = Arc::from(url);
        for mb in &self.mailboxes {
            mb.send_blocking(Mail::Shard(ShardCmd::Drain { url: url.clone(), period_ms }));
        }
    }

    /// Holds the drain's goaways not sent yet (`true`), or lets them go on (`false`).
    pub fn hold_drain(&self, hold: bool) {
        for mb in &self.mailboxes {
            mb.send_blocking(Mail::Shard(ShardCmd::DrainHold(hold)));
        }
    }

    /// Closes every connection with 1001 and waits for the shards (bounded).
    pub fn shutdown(mut self) {
        self.monitor.stop();
        for mb in &self.mailboxes {
            mb.send_blocking(Mail::Shard(ShardCmd::Shutdown));
        }
        for h in self.shard_threads.drain(..) {
            let _ = h.join();
        }
        for mb in &self.engine_mailboxes {
            mb.send_blocking(Mail::Shard(ShardCmd::Shutdown));
        }
        for h in self.engine_threads.drain(..) {
            let _ = h.join();
        }
        if let Some(h) = self.store_thread.take() {
            let _ = h.join();
        }
    }
}

/// Publishes this edge's load to Redis every second, until the process ends.
#[expect(clippy::too_many_arguments, reason = "each is a separate handle the spawned task owns")]
pub async fn report_load(
    mut cm: crate::bus::redis::Conn,
    id: String,
    ws_url: String,
    metrics: Arc<Metrics>,
    kernel: Arc<KernelView>,
    capacity: u64,
    board: Arc<LoadBoard>,
    egress_bytes_per_s: f64,
    draining: Arc<std::sync::atomic::AtomicBool>,
    mut now: tokio::sync::mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>,
) {
    use crate::dispatch::{EdgeLoad, registry};
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let (mut last_frames, mut last_bytes, mut last_at) = (0u64, 0u64, Instant::now());
    loop {
        // Every second, or at once when asked (a drain must leave dispatch before it starts).
        let done = tokio::select! {
            _ = tick.tick() => None,
            req = now.recv() => req,
        };
        let (frames, bytes) = metrics.written();
        let dt = last_at.elapsed().as_secs_f64().max(1e-3);
        let load = EdgeLoad {
            id: id.clone(),
            ws_url: ws_url.clone(),
            connections: metrics.connections().max(0) as u64,
            capacity,
            frames_per_s: frames.saturating_sub(last_frames) as f64 / dt,
            bytes_per_s: bytes.saturating_sub(last_bytes) as f64 / dt,
            frames_capacity_per_s: board.capacity(),
            egress_capacity_bytes_per_s: egress_bytes_per_s,
            health: kernel.status(),
            draining: draining.load(std::sync::atomic::Ordering::Relaxed),
            at_ms: crate::bus::now_us() / 1000,
        };
        (last_frames, last_bytes, last_at) = (frames, bytes, Instant::now());
        if let Err(e) = registry::report(&mut cm, &load, crate::ingest::REPORT_MAX_AGE_MS).await {
            tracing::warn!(error = %e, "cannot publish load report");
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}
