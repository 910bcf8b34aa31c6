//! roomcast client for tokio.
//!
//! Connects to a roomcast edge (through its dispatch endpoint or a fixed URL), joins a room and
//! hands the application the room's messages as typed [`Event`]s, keeping the delivery promises
//! of docs/PROTOCOL.md across reconnects: it follows `goaway` when an edge drains, backs off with
//! full jitter, resumes with `since` and `epoch`, reports recovered messages, explicit gaps and
//! resets, and never hands the application a duplicate.
//!
//! The wire formats (JSON `roomcast.json.v1`, rkyv `roomcast.rkyv.v2`) are the edge's own
//! ([`roomcast_proto`]); this crate adds the connection's life around them.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use roomcast_client::{Client, Config, Event};
//! let config = Config::dispatch("http://127.0.0.1:8081/v1/route").room("lobby").rkyv();
//! let (client, mut events) = Client::start(config)?;
//! while let Some(ev) = events.recv().await {
//!     if let Event::Message(m) = ev {
//!         println!("{} #{} {:?} {}: {}", m.room, m.seq, m.kind, m.user, m.body);
//!     }
//! }
//! # client.close().await; Ok(()) }
//! ```
//!
//! Modules by layer: [`backoff`], `rooms` (positions, dedup, gaps, resets), `retry` (close
//! codes and refusals) and `urls` are pure and unit-tested; `client` is the one task that owns
//! the socket and the timers.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod backoff;
mod client;
mod config;
mod event;
mod retry;
mod rooms;
mod token;
mod urls;

pub use backoff::Backoff;
pub use client::{Client, Events, RequestError};
pub use config::{Config, ConfigError, Encoding, Endpoint};
pub use event::{ConnectionState, ErrorEvent, Event, Kind, Message, Position};
pub use token::{BoxError, TokenSource, jwt_exp};
pub use urls::UrlError;
