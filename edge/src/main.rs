//! The `edge` binary: flags and config, logging, start, and graceful stop on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use edge::config::Config;
use edge::ingest::{self, AppState};
use edge::server::Edge;

/// roomcast push edge.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML config file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// WebSocket listen address [default: 0.0.0.0:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Publish API, /healthz and /metrics address [default: 127.0.0.1:8081].
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Shard threads (0 = one per CPU).
    #[arg(long)]
    shards: Option<usize>,
    /// Merge window in milliseconds (0 = no merging).
    #[arg(long)]
    merge_window_ms: Option<u64>,
    /// Largest client message in bytes.
    #[arg(long)]
    max_message: Option<usize>,
    /// Bytes queued per connection before it is closed as a slow consumer.
    #[arg(long)]
    max_queue_bytes: Option<usize>,
    /// Echo every message back (conformance testing with the Autobahn suite).
    #[arg(long)]
    echo: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
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
    if let Some(v) = cli.merge_window_ms {
        cfg.fanout.merge_window_ms = v;
    }
    if let Some(v) = cli.max_message {
        cfg.ws.max_message = v;
    }
    if let Some(v) = cli.max_queue_bytes {
        cfg.send.max_queue_bytes = v;
    }
    if cli.echo {
        cfg.echo = true;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if cli.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let cfg = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge: invalid configuration: {e:#}");
            std::process::exit(2);
        }
    };
    if cli.check_config {
        println!("configuration ok");
        return Ok(());
    }
    let cfg = Arc::new(cfg);
    let edge = Edge::start(cfg.clone())?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.ingest.threads)
        .thread_name("roomcast-http")
        .enable_all()
        .build()?;
    let state = AppState {
        bus: edge.bus.clone(),
        metrics: edge.metrics.clone(),
        shards: edge.shards,
        started: edge.started,
    };
    let app = ingest::router(state, cfg.ingest.max_body_bytes);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(cfg.http))
        .with_context(|| format!("cannot listen on {} (http)", cfg.http))?;
    let http_addr = listener.local_addr()?;
    rt.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "publish API stopped");
        }
    });
    tracing::info!(ws = %edge.ws_addr, http = %http_addr, shards = edge.shards, echo = cfg.echo, "roomcast edge ready");
    // A line for scripts and tests that start the edge on port 0.
    println!("roomcast edge ready ws={} http={}", edge.ws_addr, http_addr);

    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: closing connections (1001)"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: closing connections (1001)"),
        }
    });
    edge.shutdown();
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    tracing::info!("stopped");
    Ok(())
}
