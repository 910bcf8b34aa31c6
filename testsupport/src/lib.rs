//! What the integration tests of every package share (edge, loadgen, benches): start the real
//! `edge` binary and read its ready line, connect WebSocket clients, publish over HTTP, start a
//! Redis, a Redis Cluster or Sentinels, and wait for a condition by polling it (never by
//! sleeping a fixed time). Not published: it exists for this workspace's tests.

// Its helpers panic on purpose (a failed spawn, handshake or assertion is a failed test, with
// the message saying which); a `# Panics` section on each would say that twenty times.
#![allow(clippy::missing_panics_doc)]

mod edge;
mod http;
mod redis;
mod tls;
mod ws;

pub use edge::*;
pub use http::*;
pub use redis::*;
pub use tls::*;
pub use ws::*;

use std::time::{Duration, Instant};

/// Polls `f` until it returns true or the deadline passes.
pub async fn wait_until<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(d: Duration, mut f: F) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
