//! Joins a room and prints what arrives, one line per event.
//!
//! ```sh
//! cargo run -p roomcast-client --example listen -- --dispatch http://127.0.0.1:8081/v1/route --room lobby
//! cargo run -p roomcast-client --example listen -- --url ws://127.0.0.1:8080/ws --room lobby --rkyv
//! ```

use std::time::Duration;

use clap::Parser;
use roomcast_client::{Backoff, Client, Config, ConnectionState, Event, TokenSource};

/// Join a roomcast room and print what arrives.
#[derive(Parser, Debug)]
struct Args {
    /// Dispatch endpoint (http://HOST:PORT/v1/route on any edge's HTTP port).
    #[arg(long, conflicts_with = "url", required_unless_present = "url")]
    dispatch: Option<String>,
    /// A fixed edge WebSocket URL (ws://HOST:PORT/ws) instead of dispatch.
    #[arg(long)]
    url: Option<String>,
    /// Room to join.
    #[arg(long)]
    room: String,
    /// Use the rkyv encoding (roomcast.rkyv.v2) instead of JSON.
    #[arg(long)]
    rkyv: bool,
    /// Connection token (JWT), e.g. from `edge token --sub me`.
    #[arg(long)]
    token: Option<String>,
    /// Smallest and largest reconnect delay, in milliseconds.
    #[arg(long, default_value_t = 500)]
    backoff_min_ms: u64,
    #[arg(long, default_value_t = 20_000)]
    backoff_max_ms: u64,
    /// Dead-connection bound, in seconds.
    #[arg(long, default_value_t = 20)]
    liveness_s: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = match (&args.dispatch, &args.url) {
        (Some(d), _) => Config::dispatch(d),
        (None, Some(u)) => Config::url(u),
        (None, None) => unreachable!("clap requires one"),
    };
    cfg = cfg.room(&args.room).liveness(Duration::from_secs(args.liveness_s)).backoff(Backoff {
        min: Duration::from_millis(args.backoff_min_ms),
        max: Duration::from_millis(args.backoff_max_ms),
        ..Backoff::default()
    });
    if args.rkyv {
        cfg = cfg.rkyv();
    }
    if let Some(t) = args.token.clone() {
        // A real application asks its back end here; the example hands out the one it was given.
        cfg = cfg.token(TokenSource::new(move || {
            let t = t.clone();
            async move { Ok(t) }
        }));
    }
    let (client, mut events) = Client::start(cfg)?;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                None => break,
                Some(Event::Message(m)) => {
                    let tag = if m.recovered { " (recovered)" } else { "" };
                    println!("{} #{} {} {}: {}{tag}", m.room, m.seq, m.kind.as_str(), m.user, m.body);
                }
                Some(Event::State(ConnectionState::Closed)) => break,
                Some(other) => eprintln!("{other:?}"),
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.close().await;
    Ok(())
}
