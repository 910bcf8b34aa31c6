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

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where this test process keeps its files (configs, data directories, Redis directories,
/// certificates, load generator results): `$TMPDIR/roomcast-tests/<pid>/`. Test processes end
/// without destructors, so each one's files used to stay in /tmp for good (1,329 directories
/// after a day of runs here); the first call in a process removes the directories of test
/// processes that are no longer running, so what is left is bounded by the processes alive.
pub fn scratch() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let parent = std::env::temp_dir().join("roomcast-tests");
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for e in entries.flatten() {
                let gone = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
                if gone {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let root = parent.join(std::process::id().to_string());
        std::fs::create_dir_all(&root).expect("the test scratch directory");
        root
    })
    .clone()
}

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
