//! roomcast edge: a thread-per-core io_uring WebSocket gateway for live rooms.
//!
//! See ARCHITECTURE.md for the data path. In short: [`shard`]s (one pinned thread and one
//! io_uring each) hold connections and their part of every room; each shard also hosts one room
//! [`engine`], which numbers, merges and serializes its rooms' messages once and hands the same
//! frame bytes to every shard with members, over the [`bus`] mailboxes; [`ingest`] is the
//! publish API on its own runtime; [`auth`] and [`ipguard`] decide who gets in.

// Every public item says what it is for; clippy runs with -D warnings (scripts/test.sh).
#![warn(missing_docs)]

pub mod auth;
pub mod bus;
pub mod config;
pub mod deflate;
pub mod dispatch;
pub mod drain;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod ingest;
pub mod ipguard;
pub mod listen_guard;
pub mod metrics;
pub mod moderation;
pub mod perfcount;
pub mod room;
pub mod server;
pub mod shard;
pub mod store;
pub mod sys;
pub mod tls;
pub mod top;
pub mod uring;
