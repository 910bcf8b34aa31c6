//! The edge under test: the real `edge` binary on ephemeral loopback ports, its ready line
//! read for the addresses it bound, its own data directory, stopped when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Writes a config file for one test and returns its path.
pub fn config(name: &str, text: &str) -> String {
    let dir = crate::scratch().join(format!("roomcast-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("edge.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

/// The edge binary under test: `ROOMCAST_EDGE_BIN` if set (to show that a test fails on an
/// older build: `ROOMCAST_EDGE_BIN=/path/to/old/edge cargo test --test NAME`), else this
/// build's, which cargo puts in `target/<profile>/` beside the `deps/` directory holding the
/// running test (`cargo test` builds the edge package's binary for its own tests; the other
/// packages' tests run under `cargo test --workspace`, which builds it too).
pub fn edge_bin() -> String {
    if let Ok(bin) = std::env::var("ROOMCAST_EDGE_BIN") {
        return bin;
    }
    let me = std::env::current_exe().expect("the test's path");
    let profile_dir = me.parent().and_then(|p| p.parent()).expect("target/<profile>");
    let edge: PathBuf = profile_dir.join("edge");
    assert!(
        edge.exists(),
        "{} is missing: build it first (`cargo build -p edge --bins`, or `cargo test --workspace`)",
        edge.display()
    );
    edge.to_str().expect("a UTF-8 path").to_owned()
}

/// A running edge process, stopped with SIGTERM when dropped.
pub struct EdgeProc {
    pub child: Child,
    pub ws: SocketAddr,
    pub http: SocketAddr,
    /// The data directory this helper made for the edge (removed on drop).
    pub own_data: Option<std::path::PathBuf>,
}

/// A fresh data directory for one edge of one test.
pub fn data_dir(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = crate::scratch().join(format!(
        "roomcast-data-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

impl EdgeProc {
    /// Starts the real edge on ephemeral loopback ports. Unless `args` name a data directory
    /// (or `--no-store`), the edge gets a fresh one of its own, removed when it is dropped.
    pub fn start(args: &[&str]) -> Self {
        let own = (!args.iter().any(|a| *a == "--data-dir" || *a == "--no-store")).then(|| data_dir("edge"));
        let mut e = Self::spawn(args, own.as_deref(), None);
        e.own_data = own;
        e
    }

    /// Starts the edge on `data` (kept when the edge stops: for restarts), collecting its log
    /// (stderr, at `level`) into the returned buffer.
    pub fn start_on(
        data: &std::path::Path,
        args: &[&str],
        level: &str,
    ) -> (Self, std::sync::Arc<std::sync::Mutex<String>>) {
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let e = Self::spawn(args, Some(data), Some((log.clone(), level)));
        (e, log)
    }

    fn spawn(
        args: &[&str],
        data: Option<&std::path::Path>,
        log: Option<(std::sync::Arc<std::sync::Mutex<String>>, &str)>,
    ) -> Self {
        let mut cmd = Command::new(edge_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
        if let Some(d) = data {
            cmd.arg("--data-dir").arg(d);
        }
        let level = log
            .as_ref()
            .map_or_else(|| std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()), |(_, l)| (*l).to_owned());
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(if log.is_some() { Stdio::piped() } else { Stdio::inherit() })
            .spawn()
            .expect("spawn edge");
        if let Some((buf, _)) = log {
            let err = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("{l}");
                    buf.lock().unwrap().push_str(&(l + "\n"));
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("roomcast edge ready") => break l,
                Some(Ok(_)) => {}
                _ => panic!("edge exited before it was ready (status {:?})", child.wait()),
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        };
        Self { ws: field("ws="), http: field("http="), child, own_data: None }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.ws)
    }

    pub fn sigterm(&mut self) {
        // SAFETY-free: kill(1) via the command line keeps the tests free of unsafe.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
    }

    /// Waits for exit; returns the status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for EdgeProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.sigterm();
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if let Some(d) = self.own_data.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
