//! The Rust client (`clients/rust`, crate roomcast-client) against real edges:
//! - a drain: two edges on one real redis-server, hundreds of clients (half JSON, half rkyv) in
//!   one room, gifts published before, during and after a SIGTERM drain of one edge: every
//!   client ends with every gift exactly once, in order;
//! - restarts of the embedded single-node edge: killed (-9) and restarted on the same data dir,
//!   clients come back and recover what was published while they were away with `since`; restarted
//!   on a wiped data dir, they are told `reset` and follow the new numbering.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roomcast_client::{Backoff, Client, Config, ConnectionState, Event, Events, Kind};
use roomcast_testsupport::*;

/// What one client saw, in order.
#[derive(Default, Debug)]
struct Record {
    /// Gifts as (epoch index: how many resets came before, seq, recovered).
    gifts: Vec<(u32, u64, bool)>,
    /// `Joined` events: (epoch, seq, resumed, when).
    joined: Vec<(String, u64, bool, Instant)>,
    resets: Vec<(String, u64, String)>,
    gaps: Vec<(u64, u64)>,
    goaways: u32,
    /// The `url` of the last goaway.
    goaway_url: Option<String>,
    /// URLs of the connections opened.
    connected: Vec<String>,
    errors: Vec<String>,
}

impl Record {
    fn last_gift(&self, epoch_index: u32) -> u64 {
        self.gifts.iter().filter(|g| g.0 == epoch_index).map(|g| g.1).max().unwrap_or(0)
    }

    fn seqs(&self, epoch_index: u32) -> Vec<u64> {
        self.gifts.iter().filter(|g| g.0 == epoch_index).map(|g| g.1).collect()
    }
}

/// Reads a client's events into its record until the client stops.
fn collect(mut events: Events, rec: Arc<Mutex<Record>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let mut r = rec.lock().unwrap();
            match ev {
                Event::Message(m) => {
                    assert_eq!(m.kind, Kind::Gift, "only gifts are published here: {m:?}");
                    let epoch_index = r.resets.len() as u32;
                    r.gifts.push((epoch_index, m.seq, m.recovered));
                }
                Event::Joined { epoch, seq, resumed, .. } => r.joined.push((epoch, seq, resumed, Instant::now())),
                Event::Reset { epoch, seq, reason, .. } => r.resets.push((epoch, seq, reason)),
                Event::Gap { from, to, .. } => r.gaps.push((from, to)),
                Event::Goaway { url, .. } => {
                    r.goaways += 1;
                    r.goaway_url = Some(url);
                }
                Event::State(ConnectionState::Connected { url, .. }) => r.connected.push(url),
                Event::Error(e) => r.errors.push(e.to_string()),
                _ => {}
            }
        }
    })
}

/// Starts `n` clients, the even ones JSON and the odd ones rkyv, configured by `cfg(i)`.
fn start_clients(n: usize, cfg: impl Fn(usize) -> Config) -> Vec<(Client, Arc<Mutex<Record>>)> {
    (0..n)
        .map(|i| {
            let c = if i % 2 == 1 { cfg(i).rkyv() } else { cfg(i) };
            let (client, events) = Client::start(c).expect("client config");
            let rec = Arc::new(Mutex::new(Record::default()));
            collect(events, rec.clone());
            (client, rec)
        })
        .collect()
}

async fn wait_all(clients: &[(Client, Arc<Mutex<Record>>)], d: Duration, what: &str, f: impl Fn(&Record) -> bool) {
    let ok = wait_until(d, || async { clients.iter().all(|(_, r)| f(&r.lock().unwrap())) }).await;
    if !ok {
        let bad: Vec<String> = clients
            .iter()
            .enumerate()
            .filter(|(_, (_, r))| !f(&r.lock().unwrap()))
            .take(3)
            .map(|(i, (_, r))| format!("client {i}: {:?}", r.lock().unwrap()))
            .collect();
        panic!("{what}: not within {d:?}; e.g.\n{}", bad.join("\n"));
    }
}

fn edge_on_redis(redis: &RedisProc, name: &str) -> EdgeProc {
    // Goaways spread over 2 s; the test has gifts in flight all along.
    let cfg = config(name, "[drain]\nperiod_ms = 2000\ndeadline_ms = 15000\n");
    let url = redis.url();
    EdgeProc::start(&["--shards", "1", "--merge-window-ms", "10", "--bus", &url, "--config", &cfg])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_follow_a_drain_with_every_gift_once() {
    const N: usize = 300;
    const ROOM: &str = "drain-room";
    let redis = RedisProc::start();
    let mut a = edge_on_redis(&redis, "rcli-a");
    let b = edge_on_redis(&redis, "rcli-b");
    let (pa, pb) = (Publisher::new(a.http), Publisher::new(b.http));
    let a_ws = a.ws.to_string();
    let b_ws = b.ws.to_string();
    // Load reports go out every second: wait until dispatch knows both edges.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let mut seen = BTreeSet::new();
            for _ in 0..20 {
                let (s, body) = pb.get(&format!("/v1/route?room={ROOM}")).await;
                if s == 200 {
                    seen.insert(body.contains(&a_ws));
                }
            }
            seen.len() == 2
        })
        .await,
        "dispatch knows both edges"
    );
    // Two in three clients on the edge to drain by its URL; the rest through dispatch (which
    // spreads them over both).
    let backoff = Backoff { min: Duration::from_millis(100), max: Duration::from_secs(2), ..Backoff::default() };
    let a_url = format!("ws://{a_ws}/ws");
    let dispatch = format!("http://{}/v1/route", b.http);
    let clients = start_clients(N, |i| {
        let c = if i % 3 == 0 { Config::dispatch(&dispatch) } else { Config::url(&a_url) };
        c.room(ROOM).backoff(backoff).liveness(Duration::from_secs(5))
    });
    wait_all(&clients, Duration::from_secs(30), "every client joined", |r| !r.joined.is_empty()).await;
    let on_a: Vec<bool> = clients.iter().map(|(_, r)| r.lock().unwrap().connected[0].contains(&a_ws)).collect();
    let n_on_a = on_a.iter().filter(|x| **x).count();
    assert!(n_on_a >= N / 2, "{n_on_a} of {N} clients on the edge to drain");

    // Before: gifts through both edges' publish APIs.
    let mut gifts = Vec::new();
    for n in 0..20u64 {
        gifts.push(publish_gift(if n % 2 == 0 { &pa } else { &pb }, ROOM, n).await);
    }
    // During: SIGTERM the edge, keep publishing through the other until it has exited.
    a.sigterm();
    let drained_at = Instant::now();
    let mut n = 20u64;
    let status = loop {
        gifts.push(publish_gift(&pb, ROOM, n).await);
        n += 1;
        if let Ok(Some(st)) = a.child.try_wait() {
            break st;
        }
        assert!(drained_at.elapsed() < Duration::from_secs(25), "the drained edge did not exit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status.code(), Some(0), "the drained edge exits 0");
    let during = gifts.len() - 20;
    // After.
    for _ in 0..20 {
        gifts.push(publish_gift(&pb, ROOM, n).await);
        n += 1;
    }
    let last = *gifts.last().unwrap();
    assert_eq!(gifts, (1..=last).collect::<Vec<_>>(), "one numbering across both edges");
    wait_all(&clients, Duration::from_secs(20), "every client has the last gift", |r| r.last_gift(0) >= last).await;

    let (mut moved, mut recovered) = (0, 0);
    for (i, (_, r)) in clients.iter().enumerate() {
        let r = r.lock().unwrap();
        assert_eq!(r.seqs(0), gifts, "client {i}: every gift exactly once, in order: {r:?}");
        assert!(r.gaps.is_empty() && r.resets.is_empty(), "client {i}: {r:?}");
        if on_a[i] {
            assert!(r.goaways >= 1, "client {i} was on the drained edge and got no goaway: {r:?}");
            // The edge names its dispatch endpoint with the room already in it (the client sets
            // the room itself anyway).
            let want = format!("http://{}/v1/route?room={ROOM}", a.http);
            assert_eq!(r.goaway_url.as_deref(), Some(want.as_str()), "client {i}");
            assert!(r.connected.last().unwrap().contains(&b_ws), "client {i} ended on {:?}", r.connected);
            assert!(r.joined.iter().skip(1).all(|j| j.2), "client {i}: reconnects resume with since: {r:?}");
            moved += 1;
        }
        recovered += r.gifts.iter().filter(|g| g.2).count();
    }
    assert_eq!(moved, n_on_a);
    // Gifts published while clients were between edges came back through `since`.
    assert!(recovered > 0, "no gift was recovered: the drain never caught a client between edges");
    eprintln!(
        "drain: {N} clients ({n_on_a} moved), {} gifts ({during} during the drain), {recovered} deliveries recovered",
        gifts.len()
    );
    for (c, _) in clients {
        c.close().await;
    }
}

/// An edge on fixed ports and a data dir of the test's (restarts keep its address), killed
/// with SIGKILL when dropped.
struct FixedEdge {
    child: Child,
}

impl FixedEdge {
    fn start(ws: u16, http: u16, data: &Path) -> Self {
        let mut child = Command::new(edge_bin())
            .args(["--listen", &format!("127.0.0.1:{ws}"), "--http", &format!("127.0.0.1:{http}")])
            .args(["--shards", "1", "--merge-window-ms", "10", "--data-dir"])
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn edge");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("roomcast edge ready") => break,
                Some(Ok(_)) => {}
                _ => panic!("edge exited before it was ready: {:?}", child.wait()),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Self { child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the edge and waits until its ports can be bound again: the kernel tears a dead
    /// process's io_uring down asynchronously, and the listening sockets registered in it
    /// outlive the process for a moment (the next edge would find the port served and refuse
    /// it, as it should).
    fn kill9_and_wait_ports(&mut self, ports: [u16; 2]) {
        self.kill9();
        let t = Instant::now();
        for port in ports {
            while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                assert!(t.elapsed() < Duration::from_secs(10), "port {port} still held 10 s after the kill");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        eprintln!("ports free {:?} after the kill", t.elapsed());
    }
}

impl Drop for FixedEdge {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_recover_across_restarts_and_are_reset_on_a_wiped_store() {
    const N: usize = 40;
    const ROOM: &str = "restart-room";
    let (ws, http) = (free_port(), free_port());
    let data = data_dir("rcli-restart");
    let mut edge = FixedEdge::start(ws, http, &data);
    let p = Publisher::new(format!("127.0.0.1:{http}").parse().unwrap());
    // Clients come back 1.5 to 3 s after a loss: the gifts published at once after the restart
    // are then missed, and must come back through `since`.
    let backoff = Backoff { min: Duration::from_millis(1500), max: Duration::from_secs(3), ..Backoff::default() };
    let url = format!("ws://127.0.0.1:{ws}/ws");
    let clients = start_clients(N, |_| Config::url(&url).room(ROOM).backoff(backoff).liveness(Duration::from_secs(5)));
    wait_all(&clients, Duration::from_secs(20), "every client joined", |r| !r.joined.is_empty()).await;
    let first_epoch = clients[0].1.lock().unwrap().joined[0].0.clone();

    for n in 0..10 {
        assert_eq!(publish_gift(&p, ROOM, n).await, n + 1);
    }
    wait_all(&clients, Duration::from_secs(10), "gifts 1..=10", |r| r.last_gift(0) >= 10).await;

    // Crash and restart on the same data dir; publish at once, before the clients are back.
    edge.kill9_and_wait_ports([ws, http]);
    let mut edge = FixedEdge::start(ws, http, &data);
    // A crash skips at most the block of seqs the store had reserved (never reuses one).
    let mut gifts: Vec<u64> = (1..=10).collect();
    for n in 10..20 {
        gifts.push(publish_gift(&p, ROOM, n).await);
    }
    assert!(gifts.windows(2).all(|w| w[0] < w[1]) && gifts[10] <= 10 + 1025, "numbering continues: {gifts:?}");
    let last = gifts[19];
    let published = Instant::now();
    wait_all(&clients, Duration::from_secs(15), "the gifts published after the restart", |r| r.last_gift(0) >= last)
        .await;
    let mut came_back_later = 0;
    for (i, (_, r)) in clients.iter().enumerate() {
        let r = r.lock().unwrap();
        assert_eq!(r.seqs(0), gifts, "client {i}: every gift once, in order: {r:?}");
        assert!(r.resets.is_empty() && r.gaps.is_empty(), "client {i}: same store, same epoch: {r:?}");
        let back = r.joined.last().unwrap();
        assert!(back.2 && back.0 == first_epoch, "client {i} resumed with since in the same epoch: {r:?}");
        if back.3 > published {
            // Back after all of 11..=20 were published: all of them came through `since`.
            came_back_later += 1;
            let rec: Vec<bool> = r.gifts[10..].iter().map(|g| g.2).collect();
            assert!(rec.iter().all(|x| *x), "client {i}: gifts missed while away are flagged recovered: {r:?}");
        }
    }
    assert!(came_back_later >= N / 2, "only {came_back_later} of {N} clients came back after the publishes");

    // Crash and restart on a wiped data dir: the room's numbering starts again in a new epoch.
    edge.kill9_and_wait_ports([ws, http]);
    let _ = std::fs::remove_dir_all(&data);
    let _edge = FixedEdge::start(ws, http, &data);
    wait_all(&clients, Duration::from_secs(15), "every client told reset", |r| !r.resets.is_empty()).await;
    wait_all(&clients, Duration::from_secs(15), "every client rejoined", |r| {
        r.joined.last().is_some_and(|j| j.0 == r.resets[0].0)
    })
    .await;
    for n in 0..5 {
        assert_eq!(publish_gift(&p, ROOM, n).await, n + 1, "a wiped store numbers from 1");
    }
    wait_all(&clients, Duration::from_secs(10), "gifts of the new numbering", |r| r.last_gift(1) >= 5).await;
    for (i, (_, r)) in clients.iter().enumerate() {
        let r = r.lock().unwrap();
        assert_eq!(r.resets.len(), 1, "client {i}: {r:?}");
        assert_ne!(r.resets[0].0, first_epoch, "client {i}: a new epoch");
        assert_eq!(r.seqs(0), gifts, "client {i}");
        // Seqs 1..=5 again, of the new numbering: delivered, not taken for duplicates.
        assert_eq!(r.seqs(1), (1..=5).collect::<Vec<_>>(), "client {i}: {r:?}");
    }
    for (c, _) in clients {
        c.close().await;
    }
    let _ = std::fs::remove_dir_all(&data);
}
