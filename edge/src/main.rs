//! The `edge` binary: flags and config, logging, start, drain and graceful stop.
//!
//! - `edge [flags]`: run an edge.
//! - `edge dispatch --redis URL --http ADDR`: run only the dispatch endpoint (`GET /v1/route`),
//!   reading every edge's load report from Redis; `GET /metrics` and `GET /healthz` beside it.
//!
//! Signals: SIGTERM drains (out of dispatch, stop accepting, `goaway` spread over
//! `drain.period_ms`, then 1001 for the rest) and exits 0; SIGINT closes everything with 1001 at
//! once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge::config::Config;
use edge::ingest::{self, AppState, RouteSource};
use edge::server::Edge;

/// roomcast push edge.
// Numeric flags take a value with a leading '-' (`allow_negative_numbers`): `--shards -5` is
// then refused by the value's own parser ("invalid digit found in string"), naming the flag,
// instead of clap's "unexpected argument '-5'", which named no flag.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// TOML config file; flags override its values.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// WebSocket listen address [default: 0.0.0.0:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Publish API, /healthz and /metrics address [default: 127.0.0.1:8081].
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Shard threads (0 = one per CPU).
    #[arg(long, allow_negative_numbers = true)]
    shards: Option<usize>,
    /// Merge window in milliseconds (0 = no merging).
    #[arg(long, allow_negative_numbers = true)]
    merge_window_ms: Option<u64>,
    /// Largest client message in bytes.
    #[arg(long, allow_negative_numbers = true)]
    max_message: Option<usize>,
    /// Bytes queued per connection before it is closed as a slow consumer.
    #[arg(long, allow_negative_numbers = true)]
    max_queue_bytes: Option<usize>,
    /// Shared bus for several edges (redis://HOST:PORT, or redis-cluster://HOST:PORT,HOST:PORT,...);
    /// unset: embedded single node.
    #[arg(long)]
    bus: Option<String>,
    /// Acknowledge a must-deliver publish only once this many replicas hold it (bus.min_replicas_acked).
    #[arg(long, allow_negative_numbers = true)]
    min_replicas_acked: Option<u32>,
    /// The ws:// or wss:// URL dispatch hands out for this edge (default: ws://LISTEN/ws, or
    /// wss:// with --tls-cert).
    #[arg(long)]
    advertise: Option<String>,
    /// The public dispatch endpoint `goaway` sends clients to (`drain.dispatch_url`; default:
    /// this edge's own /v1/route).
    #[arg(long)]
    dispatch_url: Option<String>,
    /// Spread goaway messages over this many milliseconds when draining.
    #[arg(long, allow_negative_numbers = true)]
    drain_period_ms: Option<u64>,
    /// Pin shard i to the i-th allowed CPU (`pin` in the config; default true).
    #[arg(long, value_name = "BOOL")]
    pin: Option<bool>,
    /// Accept permessage-deflate offers (`ws.permessage_deflate` in the config; default true).
    #[arg(long, value_name = "BOOL")]
    permessage_deflate: Option<bool>,
    /// Echo every message back (conformance testing with the Autobahn suite).
    #[arg(long)]
    echo: bool,
    /// Start even when another process listens on the WebSocket port (rolling restart; the
    /// kernel splits new connections between the two until the old one stops).
    #[arg(long)]
    takeover: bool,
    /// Where rooms' numbering and must-deliver history are kept (single-node mode)
    /// [default: roomcast-data, in the working directory].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Keep nothing on disk: a restart gives every room a new epoch (`store.enabled = false`).
    #[arg(long)]
    no_store: bool,
    /// Serve wss:// (TLS) with this PEM certificate chain (`tls.cert`; needs --tls-key).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The certificate's PEM private key (`tls.key`). Both files are read again on SIGHUP.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Serve the HTTP API (--http) over TLS too, with the same certificate (`tls.http`).
    #[arg(long)]
    tls_http: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run only the dispatch endpoint (GET /v1/route), from the load reports in Redis. The same
    /// address serves GET /metrics (answers by outcome, roomcast_dispatch_answers_total) and
    /// GET /healthz.
    Dispatch {
        /// Redis holding the edges' load reports (redis:// or redis-cluster://, as the edges' bus).
        #[arg(long)]
        redis: String,
        /// Listen address for GET /v1/route, GET /metrics and GET /healthz.
        #[arg(long, default_value = "127.0.0.1:8090")]
        http: SocketAddr,
        /// Browser origins allowed to read the answer (CORS), as `ws.allowed_origins`; repeat
        /// the flag for several. None: any origin.
        #[arg(long = "allow-origin")]
        allow_origins: Vec<String>,
        /// Serve https with this PEM certificate chain (needs --tls-key; reloaded on SIGHUP).
        #[arg(long, value_name = "FILE")]
        tls_cert: Option<PathBuf>,
        /// The certificate's PEM private key.
        #[arg(long, value_name = "FILE")]
        tls_key: Option<PathBuf>,
        /// Listen backlog (capped by net.core.somaxconn): every client of a reconnect storm
        /// asks here first, on a new connection.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(i32).range(1..), allow_negative_numbers = true)]
        backlog: i32,
    },
    /// Watch a running edge's kernel figures and health, refreshed every second (like `ss` +
    /// `top`): TCP states, Send-Q/Recv-Q histograms, accept queues, retransmits.
    Top {
        /// The edge's HTTP address (its --http).
        #[arg(long, default_value = "127.0.0.1:8081")]
        http: SocketAddr,
        /// Print one screen and exit.
        #[arg(long)]
        once: bool,
    },
    /// Print an HS256 connection token signed with the configured secret (`auth.hs256_secret`
    /// in --config, or ROOMCAST_AUTH_SECRET), for tests and back ends without a JWT library.
    Token {
        /// The user (`sub`).
        #[arg(long)]
        sub: String,
        /// A room the token allows (repeat; exact names or prefixes ending in `*`). None: any.
        #[arg(long = "room")]
        rooms: Vec<String>,
        /// A kind the user may publish over the socket (repeat). None: the kinds for clients.
        #[arg(long = "pub")]
        publish: Vec<String>,
        /// Lifetime: seconds, or with a unit (90s, 15m, 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = token_ttl, allow_negative_numbers = true)]
        ttl: u64,
    },
}

/// `edge token`: signs and prints a token.
/// `edge token --ttl`: seconds, or a number with a unit (90s, 15m, 1h, 7d); above 0 and at most
/// ten years (a longer-lived connection token is a leaked credential waiting). Checked by clap,
/// so a bad value is refused naming the flag, as the other flags' are.
fn token_ttl(ttl: &str) -> Result<u64, String> {
    let (num, unit) = ttl.find(|c: char| !c.is_ascii_digit()).map_or((ttl, ""), |i| ttl.split_at(i));
    let n: u64 = num.parse().map_err(|_| "a positive number with an optional unit s, m, h, d".to_owned())?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err("the unit is s, m, h or d".to_owned()),
    };
    n.checked_mul(scale)
        .filter(|&s| s > 0 && s <= 10 * 365 * 86_400)
        .ok_or_else(|| "above 0 and at most 10 years".to_owned())
}

fn print_token(cli: &Cli, sub: &str, rooms: &[String], publish: &[String], ttl: u64) -> anyhow::Result<()> {
    let cfg = match &cli.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    let secret = cfg
        .auth
        .hs256_secret
        .as_ref()
        .map(|s| s.expose().to_owned())
        .or_else(|| std::env::var("ROOMCAST_AUTH_SECRET").ok())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow::anyhow!("no secret: set auth.hs256_secret in --config, or ROOMCAST_AUTH_SECRET"))?;
    if secret.len() < 32 {
        anyhow::bail!("auth.hs256_secret: at least 32 bytes");
    }
    let secs = ttl;
    for r in rooms {
        let name = r.strip_suffix('*').unwrap_or(r);
        if !name.is_empty() || !r.ends_with('*') {
            roomcast_proto::envelope::validate_room(name).map_err(|why| anyhow::anyhow!("--room {r:?}: {why}"))?;
        }
    }
    for k in publish {
        if !cfg.kinds.contains_key(k) {
            anyhow::bail!("--pub {k:?}: not a configured kind");
        }
    }
    if let Err(why) = edge::auth::check_user_id(sub) {
        anyhow::bail!("--sub: {why}");
    }
    let claims = edge::auth::Claims {
        sub: sub.to_owned(),
        exp: edge::bus::now_us() / 1_000_000 + secs,
        rooms: (!rooms.is_empty()).then(|| rooms.to_vec()),
        publish: (!publish.is_empty()).then(|| publish.to_vec()),
        nbf: None,
    };
    println!("{}", edge::auth::sign_hs256(secret.as_bytes(), &claims)?);
    Ok(())
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = match &cli.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(v) = cli.listen {
        cfg.listen = v;
    }
    if let Some(v) = cli.http {
        cfg.http = v;
    }
    if let Some(v) = cli.shards {
        cfg.shards = v;
    }
    if let Some(v) = cli.pin {
        cfg.pin = v;
    }
    if let Some(v) = cli.merge_window_ms {
        cfg.fanout.merge_window_ms = v;
        cfg.adaptive.max_window_ms = cfg.adaptive.max_window_ms.max(v);
    }
    if let Some(v) = cli.max_message {
        cfg.ws.max_message = v;
    }
    if let Some(v) = cli.permessage_deflate {
        cfg.ws.permessage_deflate = v;
    }
    if let Some(v) = cli.max_queue_bytes {
        cfg.send.max_queue_bytes = v;
    }
    if let Some(v) = &cli.bus {
        let kept = cfg.bus.take().unwrap_or_else(|| edge::config::BusConfig::new(""));
        cfg.bus = Some(edge::config::BusConfig { url: v.clone(), ..kept });
    }
    if let Some(n) = cli.min_replicas_acked {
        if let Some(b) = &mut cfg.bus {
            b.min_replicas_acked = n;
        } else {
            eprintln!("edge: invalid configuration: --min-replicas-acked needs a bus (--bus or bus in the config)");
            std::process::exit(2);
        }
    }
    if let Some(v) = &cli.advertise {
        cfg.advertise = Some(v.clone());
    }
    if let Some(v) = &cli.dispatch_url {
        cfg.drain.dispatch_url = Some(v.clone());
    }
    if let Some(v) = cli.drain_period_ms {
        cfg.drain.period_ms = v;
        cfg.drain.deadline_ms = cfg.drain.deadline_ms.max(v);
    }
    if cli.echo {
        cfg.echo = true;
    }
    if cli.takeover {
        cfg.takeover = true;
    }
    if let Some(v) = &cli.data_dir {
        cfg.data_dir.clone_from(v);
    }
    if cli.no_store {
        cfg.store.enabled = false;
    }
    match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => {
            let http = cfg.tls.as_ref().is_some_and(|t| t.http);
            cfg.tls = Some(edge::tls::TlsConfig { cert: cert.clone(), key: key.clone(), http });
        }
        (None, None) => {}
        (Some(cert), None) => match &mut cfg.tls {
            Some(t) => t.cert.clone_from(cert),
            None => anyhow::bail!("tls.key: --tls-cert needs --tls-key (or [tls] key in the config)"),
        },
        (None, Some(key)) => match &mut cfg.tls {
            Some(t) => t.key.clone_from(key),
            None => anyhow::bail!("tls.cert: --tls-key needs --tls-cert (or [tls] cert in the config)"),
        },
    }
    if cli.tls_http {
        match &mut cfg.tls {
            Some(t) => t.http = true,
            None => anyhow::bail!("tls.http: --tls-http needs --tls-cert and --tls-key (or [tls])"),
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Expected failures (a held port, a bad flag, Redis down) print one line, `Error: what: why`,
/// and exit 1: no backtrace, whatever RUST_BACKTRACE says (it is for panics; with it set, as on
/// the boxes we test on, `anyhow::Result` from main printed ~20 frames after every such error).
fn main() -> std::process::ExitCode {
    match run_edge() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once. `{:#}` prints every cause after the
/// error's own text, and some errors already say their cause in it: redis-rs's refused
/// connection read "cannot connect to redis: Connection refused (os error 111): Connection
/// refused (os error 111)" (a new user's trial of `edge dispatch` with Redis down).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if cause.is_empty() || text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn run_edge() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if cli.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        // Colour only for a person at a terminal (never into a file, a pipe or journald), and
        // never with NO_COLOR set (no-color.org).
        use std::io::IsTerminal as _;
        let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        tracing_subscriber::fmt().with_ansi(ansi).with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    match &cli.cmd {
        Some(Cmd::Dispatch { redis, http, allow_origins, tls_cert, tls_key, backlog }) => {
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => {
                    let files = edge::tls::TlsConfig { cert: cert.clone(), key: key.clone(), http: true };
                    match edge::tls::Tls::load(&files) {
                        Ok(t) => {
                            t.log_validity("start");
                            Some(Arc::new(t))
                        }
                        Err(e) => {
                            eprintln!("edge dispatch: {e}");
                            std::process::exit(2);
                        }
                    }
                }
                (None, None) => None,
                _ => {
                    eprintln!("edge dispatch: --tls-cert and --tls-key go together");
                    std::process::exit(2);
                }
            };
            return dispatch_only(redis, *http, *backlog, allow_origins, tls);
        }
        Some(Cmd::Top { http, once }) => return edge::top::run(*http, *once),
        Some(Cmd::Token { sub, rooms, publish, ttl }) => return print_token(&cli, sub, rooms, publish, *ttl),
        None => {}
    }
    let cfg = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge: invalid configuration: {e:#}");
            std::process::exit(2);
        }
    };
    // The token keys are files: read them now, so --check-config says what start-up would.
    if let Err(e) = edge::auth::Verifier::from_config(&cfg.auth, std::env::var("ROOMCAST_AUTH_SECRET").ok()) {
        eprintln!("edge: invalid configuration: {e}");
        std::process::exit(2);
    }
    // The same for the TLS certificate and key: a bad file names its key (tls.cert, tls.key).
    // An expired certificate is not an invalid configuration (an edge starts with one: the
    // operator may be mid-rotation), but --check-config says so.
    if let Some(files) = &cfg.tls {
        match edge::tls::Tls::load(files) {
            Err(e) => {
                eprintln!("edge: invalid configuration: {e}");
                std::process::exit(2);
            }
            Ok(t) if cli.check_config => {
                if let Some(w) = t.validity().warning(edge::tls::unix_now()) {
                    eprintln!("edge: warning: {w}");
                }
            }
            Ok(_) => {}
        }
    }
    if cli.check_config {
        // What a running edge warns at start (server.rs): a warning, not an invalid
        // configuration, since the operator may raise net.core.somaxconn before starting it.
        if let Some(cap) = edge::sys::somaxconn()
            && i64::from(cfg.ws.backlog) > cap
        {
            eprintln!(
                "edge: warning: ws.backlog {} is above net.core.somaxconn {cap}: each shard's accept queue holds {cap}; raise net.core.somaxconn to {} for the configured depth",
                cfg.ws.backlog, cfg.ws.backlog
            );
        }
        println!("configuration ok");
        return Ok(());
    }
    let cfg = Arc::new(cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.ingest.threads)
        .thread_name("roomcast-http")
        .on_thread_start(|| {
            edge::sys::raise_thread_priority();
        })
        .enable_all()
        .build()?;
    // What dispatch hands out must reach this edge from wherever clients are: an edge on every
    // interface without --advertise would register ws://127.0.0.1, usable only on this machine.
    // With a shared bus other machines' clients get it from dispatch: refuse; alone, warn.
    if cfg.advertise.is_none() && cfg.listen.ip().is_unspecified() {
        if cfg.bus.is_some() {
            eprintln!(
                "edge: invalid configuration: advertise: required when listening on {} with a shared bus (dispatch would hand out ws://127.0.0.1:...); set --advertise ws://HOST:PORT/ws",
                cfg.listen
            );
            std::process::exit(2);
        }
        tracing::warn!(listen = %cfg.listen, "no advertise URL: /v1/route answers ws://127.0.0.1:..., which only clients on this machine can use (set advertise / --advertise)");
    } else if cfg.advertise.is_none() && cfg.listen.ip().is_loopback() && cfg.bus.is_some() {
        tracing::warn!(listen = %cfg.listen, "listening on loopback with a shared bus: only clients on this machine can reach this edge through dispatch");
    }
    // The same depth as the WebSocket listeners': clients of a storm ask /v1/route first. Bound
    // before the shards listen, so a takeover whose HTTP port is taken fails before its shards
    // join the WebSocket port and take connections they would then drop.
    let listener = {
        let _rt = rt.enter();
        http_listener(cfg.http, cfg.ws.backlog, if cfg.takeover { TAKEOVER_HTTP } else { "" })?
    };
    let edge = Edge::start(cfg.clone(), rt.handle())?;
    let ws_url = cfg.advertised_url(edge.ws_addr);
    let draining = Arc::new(AtomicBool::new(false));

    let (report_tx, report_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut report_now = None;
    let route = match &cfg.bus {
        None => RouteSource::Embedded { url: ws_url.clone() },
        Some(url) => {
            let cm = rt.block_on(edge::bus::redis::Conn::connect(&url.url)).context("bus: cannot connect to redis")?;
            let id = cfg.edge_name(edge.ws_addr);
            rt.spawn(edge::server::report_load(
                cm.clone(),
                id,
                ws_url.clone(),
                edge.metrics.clone(),
                edge.kernel.clone(),
                edge.capacity,
                edge.load.clone(),
                cfg.dispatch.egress_bytes_per_s,
                draining.clone(),
                report_rx,
            ));
            report_now = Some(report_tx);
            RouteSource::redis(cm, edge.metrics.registry())
        }
    };
    let http_addr = listener.local_addr()?;
    // Checked by cfg.validate() already; read again here for the live table.
    let keys = ingest::PublishKeys::from_config(&cfg)?;
    keys.log_mode(&cfg, http_addr);
    let (drain_tx, mut drain_rx) = tokio::sync::mpsc::unbounded_channel();
    let state = AppState {
        bus: edge.bus.clone(),
        metrics: edge.metrics.clone(),
        kernel: edge.kernel.clone(),
        shards: edge.shards,
        started: edge.started,
        route: Arc::new(route),
        admin_token: cfg.admin_token.clone(),
        keys: Arc::new(keys),
        clients_only_kinds: Arc::new(
            cfg.kinds.iter().filter(|(_, k)| !k.publishers().api()).map(|(name, _)| name.clone()).collect(),
        ),
        drain: drain_tx,
        draining: draining.clone(),
        report_now,
        cors_origins: cfg.ws.allowed_origins.clone().into(),
        store: edge.store.clone(),
        moderation: edge.moderation.clone(),
        stream_limits: edge::bus::redis::StreamLimits {
            must_deliver: cfg.history.must_deliver,
            droppable: cfg.history.droppable,
            idempotency_ttl_s: cfg.ingest.idempotency_ttl_s,
            min_replicas_acked: cfg.bus.as_ref().map_or(0, |b| b.min_replicas_acked),
            replicas_timeout_ms: cfg.bus.as_ref().map_or(1000, |b| b.replicas_timeout_ms),
        },
        max_ban_s: cfg.moderation.max_ban_s,
        batch: ingest::BatchLimits {
            max_messages: cfg.ingest.max_batch,
            max_bytes: cfg.ingest.max_batch_bytes.max(cfg.ingest.max_body_bytes),
            max_message_bytes: cfg.ingest.max_body_bytes,
        },
        tls: edge.tls.clone(),
    };
    edge.kernel.set_drain_trigger(state.drain.clone());
    let app = ingest::router(state.clone(), cfg.ingest.max_body_bytes);
    match edge.tls.as_ref().filter(|_| cfg.tls.as_ref().is_some_and(|t| t.http)) {
        // `tls.http`: the same certificate (and SIGHUP reloads) as the WebSocket listener.
        Some(tls) => {
            let hs_timeout = Duration::from_millis(cfg.ws.handshake_timeout_ms);
            let listener = rt.block_on(async { edge::tls::HttpsListener::new(listener, tls, hs_timeout) })?;
            rt.spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "publish API stopped");
                }
            });
        }
        None => {
            rt.spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "publish API stopped");
                }
            });
        }
    }
    let (dispatch_url, guessed) = cfg.dispatch_url(http_addr);
    if guessed {
        tracing::warn!(http = %http_addr, dispatch = %dispatch_url, "goaway will send clients to a loopback dispatch URL: set drain.dispatch_url (--dispatch-url) or advertise");
    }
    tracing::info!(ws = %edge.ws_addr, http = %http_addr, advertise = %ws_url, dispatch = %dispatch_url, shards = edge.shards, echo = cfg.echo, "roomcast edge ready");
    // A line for scripts and tests that start the edge on port 0.
    println!("roomcast edge ready ws={} http={}", edge.ws_addr, http_addr);

    // SIGHUP: new TLS handshakes get the certificate and key read again from their files;
    // sessions under way keep theirs. A file that does not load keeps the old pair in use.
    // Installed with or without TLS: a stray SIGHUP must not stop an edge.
    let tls = edge.tls.clone();
    let reloads = edge.metrics.tls_reloads.clone();
    let mut hup = rt.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP handler")
    })?;
    rt.spawn(async move {
        while hup.recv().await.is_some() {
            match &tls {
                Some(t) => match t.reload() {
                    Ok(()) => {
                        reloads.with_label_values(&["ok"]).inc();
                        tracing::info!("SIGHUP: TLS certificate reloaded; new handshakes use it");
                        t.log_validity("SIGHUP");
                    }
                    Err(e) => {
                        reloads.with_label_values(&["failed"]).inc();
                        tracing::warn!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificate");
                    }
                },
                None => tracing::info!("SIGHUP: nothing to reload (no [tls])"),
            }
        }
    });
    let drain = rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); true }
            _ = drain_rx.recv() => { tracing::info!("drain requested"); true }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: closing connections (1001)"); false }
        }
    });
    if drain {
        rt.block_on(state.leave_dispatch());
        let fleet = match &*state.route {
            RouteSource::Redis { cm, .. } if cfg.drain.pace => {
                Some(Fleet { rt: &rt, cm: cm.clone(), me: cfg.edge_name(edge.ws_addr) })
            }
            _ => None,
        };
        run_drain(&cfg, &edge, &draining, &dispatch_url, fleet);
        if cfg.drain.dispatch_url.is_none() {
            // Our own /v1/route is the dispatch URL in the goaways just sent, and clients wait
            // up to a second (reconnect_after_ms) before asking it: keep answering a while.
            std::thread::sleep(Duration::from_millis(edge::shard::GOAWAY_MAX_DELAY_MS + 1000));
        }
    }
    edge.shutdown();
    rt.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("stopped");
    Ok(())
}

/// What a drain reads the fleet's load reports with (`drain.pace`, with a bus).
struct Fleet<'a> {
    rt: &'a tokio::runtime::Runtime,
    cm: edge::bus::redis::Conn,
    /// This edge's id in the reports.
    me: String,
}

/// The drain's pacing (`edge::drain`): judged once a second from the fleet's reports; holds
/// take at most the slack between the period and the deadline, less a second.
struct Pacing<'a> {
    fleet: Fleet<'a>,
    pacer: edge::drain::Pacer,
    budget: Duration,
    held_for: Duration,
    held_at: Option<Instant>,
    judged: Option<Instant>,
}

impl Pacing<'_> {
    fn step(&mut self, edge: &Edge, open: u64) {
        if open == 0 || self.judged.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.judged = Some(Instant::now());
        let verdict = self.verdict(open);
        self.apply(edge, open, verdict);
    }

    /// Whether the goaways wait now, and why.
    fn verdict(&mut self, open: u64) -> Option<String> {
        let used = self.held_for + self.held_at.map_or(Duration::ZERO, |t| t.elapsed());
        if used >= self.budget {
            None
        } else {
            let now_ms = edge::bus::now_us() / 1000;
            let max_age = ingest::REPORT_MAX_AGE_MS;
            let mut cm = self.fleet.cm.clone();
            let read = self.fleet.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(1), edge::dispatch::registry::live(&mut cm, now_ms, max_age))
                    .await
            });
            match read {
                Ok(Ok(reports)) => self.pacer.judge(open, &reports, now_ms, max_age),
                // Dispatch reads the same reports: it cannot route anyone either (a trial froze
                // Redis during a drain, and members sent away waited 15 s between sockets).
                Ok(Err(e)) => Some(format!("the fleet's load reports cannot be read (nor can dispatch route): {e}")),
                Err(_) => Some("the fleet's load reports cannot be read in 1 s (nor can dispatch route)".into()),
            }
        }
    }

    /// Holds the goaways or lets them go, as `verdict` says.
    fn apply(&mut self, edge: &Edge, open: u64, verdict: Option<String>) {
        match (verdict, self.held_at) {
            (Some(why), None) => {
                tracing::warn!(left = open, why = %why, "drain: goaways wait for the fleet");
                edge.hold_drain(true);
                edge.metrics.drain_held.set(1);
                edge.metrics.drain_holds.inc();
                self.held_at = Some(Instant::now());
            }
            (None, Some(at)) => {
                self.held_for += at.elapsed();
                let spent = self.held_for >= self.budget;
                tracing::info!(
                    left = open,
                    held_ms = at.elapsed().as_millis() as u64,
                    slack_left_ms = self.budget.saturating_sub(self.held_for).as_millis() as u64,
                    "drain: goaways go on{}",
                    if spent {
                        " (the slack before drain.deadline_ms is spent: the schedule runs to its end)"
                    } else {
                        ""
                    }
                );
                edge.hold_drain(false);
                edge.metrics.drain_held.set(0);
                self.held_at = None;
            }
            _ => {}
        }
    }
}

/// Leaves dispatch, stops accepting, spreads goaway over the period (held while the fleet does
/// not take members, `edge::drain`), waits for connections to fall to the threshold (or the
/// deadline), logging progress; the caller then closes the rest.
fn run_drain(cfg: &Config, edge: &Edge, draining: &AtomicBool, url: &str, fleet: Option<Fleet<'_>>) {
    draining.store(true, Ordering::Relaxed);
    edge.metrics.draining.set(1);
    let start = Instant::now();
    let before = edge.metrics.connections();
    let period = Duration::from_millis(cfg.drain.period_ms);
    let mut pacing = fleet.map(|fleet| Pacing {
        pacer: edge::drain::Pacer::new(fleet.me.clone(), before.max(0) as u64, period, cfg.drain.max_moving),
        fleet,
        budget: Duration::from_millis(cfg.drain.deadline_ms.saturating_sub(cfg.drain.period_ms))
            .saturating_sub(Duration::from_secs(1)),
        held_for: Duration::ZERO,
        held_at: None,
        judged: None,
    });
    // Holds take the slack between the period and the deadline: with none (a deadline at the
    // period, as --drain-period-ms alone leaves it), pacing can hold nothing, and says so.
    if pacing.as_ref().is_some_and(|p| p.budget.is_zero()) {
        tracing::warn!(
            period_ms = cfg.drain.period_ms,
            deadline_ms = cfg.drain.deadline_ms,
            "drain: pacing has no slack (drain.deadline_ms is within a second of drain.period_ms): goaways go on the \
             schedule whatever the fleet takes; set drain.deadline_ms above the period"
        );
    }
    tracing::info!(
        connections = before,
        period_ms = cfg.drain.period_ms,
        dispatch = %url,
        paced_by_fleet = pacing.is_some(),
        max_moving = pacing.as_ref().map(|p| p.pacer.max_moving()),
        "drain started"
    );
    // The first look before the first goaway (the shards take the hold right behind the
    // drain, in order): with Redis frozen, a look taken after would have let the first second
    // of the schedule go.
    let first = pacing.as_mut().map(|p| {
        p.judged = Some(Instant::now());
        p.verdict(before.max(0) as u64)
    });
    edge.drain(url, cfg.drain.period_ms);
    if let (Some(p), Some(verdict)) = (&mut pacing, first) {
        p.apply(edge, before.max(0) as u64, verdict);
    }
    let deadline = start + Duration::from_millis(cfg.drain.deadline_ms);
    let mut last_log = Instant::now();
    loop {
        let open = edge.metrics.connections();
        if open.max(0) as u64 <= cfg.drain.threshold {
            tracing::info!(elapsed_ms = start.elapsed().as_millis() as u64, "drain complete");
            break;
        }
        if Instant::now() >= deadline {
            tracing::info!(left = open, "drain deadline reached: closing the rest (1001)");
            break;
        }
        if last_log.elapsed() >= Duration::from_secs(1) {
            tracing::info!(left = open, of = before, "draining");
            last_log = Instant::now();
        }
        if let Some(p) = &mut pacing {
            p.step(edge, open.max(0) as u64);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a `--takeover` edge is told when its HTTP port is held (by the edge it replaces).
const TAKEOVER_HTTP: &str = "; --takeover shares the WebSocket port only: give the new edge its own --http port";

/// The HTTP API's listener (in the runtime entered), with the holder named when the port is
/// held: the WebSocket port's guard names its holder, and a bare "Address already in use" here
/// left an operator starting a takeover beside the old edge guessing which port and whose.
fn http_listener(addr: SocketAddr, backlog: i32, hint: &str) -> anyhow::Result<tokio::net::TcpListener> {
    match edge::sys::http_listener(addr, backlog).and_then(tokio::net::TcpListener::from_std) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => match edge::listen_guard::holders_of(addr) {
            Some(holders) => anyhow::bail!("cannot listen on {addr} (http): the port is held by {holders}{hint}"),
            None => Err(anyhow::Error::new(e).context(format!("cannot listen on {addr} (http){hint}"))),
        },
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot listen on {addr} (http)"))),
    }
}

/// How long `edge dispatch` lets requests under way finish once told to stop.
const DISPATCH_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

fn dispatch_only(
    redis_url: &str,
    http: SocketAddr,
    backlog: i32,
    origins: &[String],
    tls: Option<Arc<edge::tls::Tls>>,
) -> anyhow::Result<()> {
    // The kernel caps the backlog at net.core.somaxconn without a word, as it does the edge's
    // (which warns too): RESTART=peer asked for 65,535 and got the host's 4,096.
    if let Some(cap) = edge::sys::somaxconn()
        && i64::from(backlog) > cap
    {
        tracing::warn!(
            backlog,
            somaxconn = cap,
            "--backlog is above net.core.somaxconn: the accept queue holds {cap}; raise net.core.somaxconn to {backlog} for the configured depth"
        );
    }
    // The same checks as ws.allowed_origins in a config file.
    let mut check = Config::default();
    check.ws.allowed_origins = origins.to_vec();
    if let Err(e) = check.validate() {
        eprintln!("edge dispatch: invalid --allow-origin: {e:#}");
        std::process::exit(2);
    }
    let origins: Arc<[String]> = origins.into();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        let cm = edge::bus::redis::Conn::connect(redis_url).await.context("cannot connect to redis")?;
        let registry = prometheus::Registry::new();
        let src = Arc::new(RouteSource::redis(cm, &registry));
        let preflight_origins = origins.clone();
        let app =
            axum::Router::new()
                .route(
                    "/v1/route",
                    axum::routing::get(
                        move |axum::extract::State(src): axum::extract::State<Arc<RouteSource>>,
                              headers: axum::http::HeaderMap,
                              axum::extract::Query(q): axum::extract::Query<
                            std::collections::HashMap<String, String>,
                        >| async move {
                            let answer =
                                ingest::route_answer(&src, false, false, q.get("room").map(String::as_str)).await;
                            ingest::with_cors(answer, &origins, &headers)
                        },
                    )
                    .options(move |headers: axum::http::HeaderMap| async move {
                        ingest::route_preflight(&preflight_origins, &headers)
                    }),
                )
                .route("/healthz", axum::routing::get(|| async { "ok\n" }))
                // Its answers by outcome (`roomcast_dispatch_answers_total`): why clients were
                // refused is the first thing to ask of a dispatch.
                .route(
                    "/metrics",
                    axum::routing::get(move || async move {
                        let mut buf = Vec::new();
                        let _ =
                            prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &registry.gather(), &mut buf);
                        ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf)
                    }),
                )
                .with_state(src);
        let listener = http_listener(http, backlog, "")?;
        // SIGINT or SIGTERM: stop taking requests, finish those under way, exit 0. Handlers of
        // our own, installed before the ready line (a script's background job starts with SIGINT
        // ignored, and a signal right after the ready line must find them).
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("SIGINT handler")?;
        let stopping = Arc::new(tokio::sync::Notify::new());
        let notify = stopping.clone();
        let stop = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::info!("dispatch stopping");
            notify.notify_one();
        };
        println!("roomcast dispatch ready http={}", listener.local_addr()?);
        // Requests under way get DISPATCH_GRACE to finish; a client holding a half-sent request
        // does not keep the process alive past it.
        let serve: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match tls {
            Some(tls) => {
                // https, reloaded on SIGHUP like an edge's.
                let mut hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP handler")?;
                let reload = tls.clone();
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        match reload.reload() {
                            Ok(()) => {
                                tracing::info!("SIGHUP: TLS certificate reloaded");
                                reload.log_validity("SIGHUP");
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificate");
                            }
                        }
                    }
                });
                let listener = edge::tls::HttpsListener::new(listener, &tls, Duration::from_secs(10))?;
                Box::pin(async move { axum::serve(listener, app).with_graceful_shutdown(stop).await })
            }
            None => Box::pin(async move { axum::serve(listener, app).with_graceful_shutdown(stop).await }),
        };
        tokio::select! {
            r = serve => r?,
            () = async {
                stopping.notified().await;
                tokio::time::sleep(DISPATCH_GRACE).await;
            } => tracing::warn!(grace_s = DISPATCH_GRACE.as_secs(), "dispatch stopped with requests still open"),
        }
        Ok(())
    })
}
