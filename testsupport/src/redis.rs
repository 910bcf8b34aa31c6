//! Real redis-server processes for the tests that need a bus: one Redis, a Redis Cluster,
//! Sentinels; each on free loopback ports in a temporary directory, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
        // Below the ephemeral range, as `free_port` says: `restart` takes the same port again.
        let port = free_port();
        let dir = crate::scratch().join(format!("roomcast-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_at(port, dir, extra)
    }

    fn start_at(port: u16, dir: std::path::PathBuf, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--dir", dir.to_str().unwrap()])
            .args(["--logfile", dir.join("redis.log").to_str().unwrap()])
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
            assert!(Instant::now() < end, "redis-server on {port} did not start; its log ends:\n{}", log_tail(&dir));
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

/// The last lines of the redis-server log in `dir` (why a node did not start: a port taken,
/// an AOF it could not load...), for a failed test's message.
fn log_tail(dir: &std::path::Path) -> String {
    let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_else(|e| format!("(no log: {e})"));
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A free loopback TCP port (bound and released: another process may take it meanwhile, as
/// with every test here that starts a server on a chosen port), below the kernel's ephemeral
/// range (32768-60999 here): a node restarted on its port after a kill found it taken as the
/// source port of a client's reconnect when the port came from that range.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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
        let dir = crate::scratch().join(format!("roomcast-rcluster-{}-{}", std::process::id(), free_port()));
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
            .args(["--logfile", d.join("redis.log").to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server (installed by scripts/setup.sh)");
        let end = Instant::now() + Duration::from_secs(10);
        while redis_cli(port, &["PING"]).trim() != "PONG" {
            assert!(Instant::now() < end, "redis-server on {port} did not start; its log ends:\n{}", log_tail(&d));
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
        let dir = crate::scratch().join(format!("roomcast-sentinel-{}-{}", std::process::id(), free_port()));
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
