//! Shared helpers for the edge's integration tests: start the real `edge` binary on ephemeral
//! loopback ports, connect real WebSocket clients (tokio-tungstenite), publish over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use roomcast_proto::envelope::{self, ServerMsg};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Writes a config file for one test and returns its path.
pub fn config(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("roomcast-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("edge.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

/// A WebSocket client (raw TCP, 4 KiB receive buffer) that joins `room` and never reads.
pub async fn never_reader(addr: std::net::SocketAddr, room: &str) -> tokio::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&addr.into()).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut s = tokio::net::TcpStream::from_std(s.into()).unwrap();
    let req = format!(
        "GET /ws?room={room} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes()).await.unwrap();
    s
}

/// The edge binary under test: this build's, or `ROOMCAST_EDGE_BIN` (to show that a test fails
/// on an older build: `ROOMCAST_EDGE_BIN=/path/to/old/edge cargo test --test NAME`).
pub fn edge_bin() -> String {
    std::env::var("ROOMCAST_EDGE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edge").to_owned())
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
    let d = std::env::temp_dir().join(format!(
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
                Some(Ok(_)) => continue,
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

/// Connects with the given subprotocol (None: offer none).
pub async fn connect(url: &str, proto: Option<&str>) -> Ws {
    let mut req = url.into_client_request().expect("request");
    if let Some(p) = proto {
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).expect("header"));
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("connect");
    if let Some(p) = proto {
        assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok()), Some(p));
    }
    ws
}

/// Next envelope (JSON text or rkyv binary), skipping pings and batches that carry only an
/// online count (presence tests read those with `next_any`); None on close or end.
pub async fn next_msg(ws: &mut Ws) -> Option<ServerMsg> {
    loop {
        match next_any(ws).await? {
            ServerMsg::Batch { messages, online: Some(_), .. } if messages.is_empty() => continue,
            m => return Some(m),
        }
    }
}

/// Next envelope, whatever it is (pings skipped); None on close or end.
pub async fn next_any(ws: &mut Ws) -> Option<ServerMsg> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return Some(envelope::decode_json(t.as_bytes()).expect("json envelope")),
            Ok(Message::Binary(b)) => return Some(envelope::decode_rkyv(&b).expect("rkyv envelope")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Like `next_msg` with a deadline.
pub async fn next_msg_within(ws: &mut Ws, d: Duration) -> Option<ServerMsg> {
    tokio::time::timeout(d, next_msg(ws)).await.ok().flatten()
}

/// Waits for the close frame and returns its code.
pub async fn close_code(ws: &mut Ws, d: Duration) -> Option<u16> {
    let fut = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return Some(u16::from(f.code)),
                Some(Ok(Message::Close(None))) => return None,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    };
    tokio::time::timeout(d, fut).await.ok().flatten()
}

pub async fn send_json(ws: &mut Ws, v: serde_json::Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Expects `Joined` for `room` and returns its seq.
pub async fn expect_joined(ws: &mut Ws, room: &str) -> u64 {
    match next_msg_within(ws, Duration::from_secs(10)).await {
        Some(ServerMsg::Joined { room: r, seq, .. }) if r == room => seq,
        other => panic!("expected joined {room}, got {other:?}"),
    }
}

#[derive(Clone)]
pub struct Publisher {
    client: reqwest::Client,
    base: String,
}

impl Publisher {
    pub fn new(http: SocketAddr) -> Self {
        Self { client: reqwest::Client::new(), base: format!("http://{http}") }
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
        let r = self.client.post(format!("{}{path}", self.base)).body(body).send().await.expect("http");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    /// Publishes with extra request headers; returns the status, the response's headers and
    /// its JSON body.
    pub async fn publish_with(
        &self,
        room: &str,
        kind: &str,
        body: serde_json::Value,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        let req = serde_json::json!({ "kind": kind, "body": body });
        let mut r = self.client.post(format!("{}/v1/rooms/{room}/messages", self.base)).body(req.to_string());
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let r = r.send().await.expect("http");
        let (status, h) = (r.status().as_u16(), r.headers().clone());
        let text = r.text().await.unwrap_or_default();
        (status, h, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    /// Publishes and returns the assigned seq (panics unless 200).
    pub async fn publish(&self, room: &str, kind: &str, body: serde_json::Value) -> u64 {
        let req = serde_json::json!({ "kind": kind, "body": body });
        let (status, v) = self.post_raw(&format!("/v1/rooms/{room}/messages"), req.to_string().into_bytes()).await;
        assert_eq!(status, 200, "publish failed: {v}");
        v["seq"].as_u64().expect("seq")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(format!("{}{path}", self.base)).send().await.expect("http");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }
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

/// Reads one metric's value summed over its label sets from /metrics.
pub async fn metric(p: &Publisher, name: &str) -> f64 {
    let (_, text) = p.get("/metrics").await;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A real redis-server on a loopback port, with an append-only file so that a restart keeps
/// the rooms' seqs (as a production Redis would), killed when dropped.
pub struct RedisProc {
    pub child: Child,
    pub port: u16,
    pub dir: std::path::PathBuf,
}

impl RedisProc {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra redis-server arguments (`--replicaof 127.0.0.1 PORT` for a replica).
    pub fn start_with(extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("roomcast-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_at(port, dir, extra)
    }

    fn start_at(port: u16, dir: std::path::PathBuf, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--dir", dir.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server (installed by scripts/setup.sh)");
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"PING\r\n");
                let mut buf = [0u8; 7];
                if s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n" {
                    break;
                }
            }
            assert!(Instant::now() < end, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and starts a new one on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        let next = Self::start_at(self.port, self.dir.clone(), &[]);
        let old = std::mem::replace(self, next);
        std::mem::forget(old);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback TCP port (bound and released: another process may take it meanwhile, as
/// with every test here that starts a server on a chosen port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs redis-cli against `port` and returns its standard output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Redis Cluster of real redis-server processes on loopback ports (3 primaries with one
/// replica each, made by `redis-cli --cluster create`), each in its own temporary directory,
/// with AOF fsynced always; every process is killed and the directory removed when dropped.
pub struct RedisCluster {
    /// (client port, cluster bus port, process while it runs)
    pub nodes: Vec<(u16, u16, Option<Child>)>,
    pub dir: std::path::PathBuf,
}

impl RedisCluster {
    pub fn start(primaries: usize, replicas: usize) -> Self {
        let n = primaries * (1 + replicas);
        let dir = std::env::temp_dir().join(format!("roomcast-rcluster-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Self { nodes: Vec::new(), dir };
        for _ in 0..n {
            let (port, bus) = (free_port(), free_port());
            let child = c.spawn_node(port, bus);
            c.nodes.push((port, bus, Some(child)));
        }
        let addrs: Vec<String> = c.nodes.iter().map(|(p, _, _)| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        c.wait_ok(Duration::from_secs(20));
        // Replicas in sync (their first full sync done), so that WAIT can count them.
        let end = Instant::now() + Duration::from_secs(20);
        for &(port, _, _) in &c.nodes {
            loop {
                let info = redis_cli(port, &["INFO", "replication"]);
                let online = info.lines().filter(|l| l.starts_with("slave") && l.contains("state=online")).count();
                if info.contains("role:slave") || online >= replicas {
                    break;
                }
                assert!(Instant::now() < end, "replicas of {port} not in sync: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        c
    }

    /// Starts (or restarts, keeping its identity in nodes.conf and its AOF) the node on `port`
    /// and waits until it answers.
    fn spawn_node(&self, port: u16, bus: u16) -> Child {
        let d = self.dir.join(port.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--cluster-port", &bus.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", "1500", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--dir", d.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server (installed by scripts/setup.sh)");
        let end = Instant::now() + Duration::from_secs(10);
        while redis_cli(port, &["PING"]).trim() != "PONG" {
            assert!(Instant::now() < end, "redis-server on {port} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Starts the node on `port` again after `kill` (it rejoins; a primary that failed over
    /// comes back as a replica of its successor).
    pub fn restart(&mut self, port: u16) {
        let i = self.nodes.iter().position(|(p, _, _)| *p == port).expect("a node of this cluster");
        assert!(self.nodes[i].2.is_none(), "node {port} is running");
        let child = self.spawn_node(port, self.nodes[i].1);
        self.nodes[i].2 = Some(child);
    }

    /// Waits until every live node says `cluster_state:ok` and sees every slot served.
    pub fn wait_ok(&self, d: Duration) {
        let end = Instant::now() + d;
        for (port, _, child) in &self.nodes {
            if child.is_none() {
                continue;
            }
            loop {
                let info = redis_cli(*port, &["CLUSTER", "INFO"]);
                if info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384") {
                    break;
                }
                assert!(Instant::now() < end, "cluster not ok on {port}: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// `redis-cluster://` URL with two seeds.
    pub fn url(&self) -> String {
        format!("redis-cluster://127.0.0.1:{},127.0.0.1:{}", self.nodes[0].0, self.nodes[1].0)
    }

    /// A live node's port.
    pub fn any_port(&self) -> u16 {
        self.nodes.iter().find(|(_, _, c)| c.is_some()).expect("a live node").0
    }

    /// The port of the primary serving `slot`, as the cluster says now.
    pub fn owner_of(&self, slot: u16) -> u16 {
        self.owner(slot).unwrap_or_else(|| panic!("no owner of slot {slot}"))
    }

    /// The port of the primary serving `slot` (None while its primary fails and no replica
    /// has taken over yet).
    pub fn owner(&self, slot: u16) -> Option<u16> {
        for line in redis_cli(self.any_port(), &["CLUSTER", "NODES"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            for r in &f[8..] {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>())
                    && (a..=b).contains(&slot)
                {
                    let addr = f[1].split('@').next().unwrap();
                    return addr.rsplit_once(':').unwrap().1.parse().ok();
                }
            }
        }
        None
    }

    /// SIGKILL the node on `port` (as a crash would).
    pub fn kill(&mut self, port: u16) {
        for (p, _, child) in &mut self.nodes {
            if *p == port
                && let Some(mut c) = child.take()
            {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.nodes {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis Sentinels (`redis-server FILE --sentinel`) watching the master on `master_port` under
/// the name `roomcast`, on free loopback ports, each with its config in a temporary directory
/// (sentinels rewrite it); killed and removed when dropped.
pub struct Sentinels {
    pub children: Vec<Child>,
    pub ports: Vec<u16>,
    pub dir: std::path::PathBuf,
}

impl Sentinels {
    pub fn start(master_port: u16, n: usize, quorum: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("roomcast-sentinel-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Self { children: Vec::new(), ports: Vec::new(), dir };
        for _ in 0..n {
            let port = free_port();
            let conf = s.dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor roomcast 127.0.0.1 {master_port} {quorum}\n\
                     sentinel down-after-milliseconds roomcast 1000\nsentinel failover-timeout roomcast 5000\n",
                    s.dir.display()
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("redis-server --sentinel (installed by scripts/setup.sh)");
            s.children.push(child);
            s.ports.push(port);
        }
        for &port in &s.ports {
            let end = Instant::now() + Duration::from_secs(10);
            while !redis_cli(port, &["SENTINEL", "get-master-addr-by-name", "roomcast"])
                .contains(&master_port.to_string())
            {
                assert!(Instant::now() < end, "sentinel on {port} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        s
    }

    /// `redis-sentinel://` URL naming the first two sentinels.
    pub fn url(&self) -> String {
        format!("redis-sentinel://127.0.0.1:{},127.0.0.1:{}/roomcast", self.ports[0], self.ports[1])
    }

    /// The master's port as the first sentinel names it.
    pub fn master_port(&self) -> Option<u16> {
        redis_cli(self.ports[0], &["SENTINEL", "get-master-addr-by-name", "roomcast"])
            .lines()
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
