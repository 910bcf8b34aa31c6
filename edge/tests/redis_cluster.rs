//! Several edges on a real Redis Cluster (issue #16): 6 redis-server processes (3 primaries,
//! 3 replicas) made by `redis-cli --cluster create`, started by each test on free loopback ports
//! in a temporary directory and killed when it ends (also on failure).

use std::collections::BTreeSet;
use std::time::Duration;

use edge::bus::slots::slot_of;
use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;

fn edge_on(cluster: &RedisCluster) -> EdgeProc {
    let url = cluster.url();
    EdgeProc::start(&["--shards", "1", "--merge-window-ms", "10", "--bus", url.as_str()])
}

/// `n` room names for each third of the slot space (the primaries `--cluster create` makes).
fn rooms_per_primary(cluster: &RedisCluster, n: usize) -> Vec<(String, u16)> {
    let mut by_owner: std::collections::BTreeMap<u16, Vec<String>> = std::collections::BTreeMap::new();
    for i in 0.. {
        let room = format!("room-{i}");
        let owner = cluster.owner_of(slot_of(room.as_bytes()));
        let list = by_owner.entry(owner).or_default();
        if list.len() < n {
            list.push(room);
        }
        if by_owner.len() == 3 && by_owner.values().all(|l| l.len() == n) {
            break;
        }
    }
    by_owner.into_iter().flat_map(|(port, rooms)| rooms.into_iter().map(move |r| (r, port))).collect()
}

/// Reads batches until `want` seqs arrived; panics on anything else (gap, reset, close).
async fn read_seqs(ws: &mut Ws, want: usize, who: &str) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < want {
        match next_msg_within(ws, Duration::from_secs(15)).await {
            Some(ServerMsg::Batch { messages, .. }) => got.extend(messages.iter().map(|m| m.seq)),
            other => panic!("{who}: {other:?} after {got:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_on_a_cluster_deliver_every_gift_once_in_order() {
    let cluster = RedisCluster::start(3, 1);
    let edges: Vec<EdgeProc> = (0..3).map(|_| edge_on(&cluster)).collect();
    let pubs: Vec<Publisher> = edges.iter().map(|e| Publisher::new(e.http)).collect();
    let rooms = rooms_per_primary(&cluster, 2);
    assert_eq!(rooms.iter().map(|(_, p)| p).collect::<BTreeSet<_>>().len(), 3, "rooms on all three primaries");
    // Every room has members on every edge.
    let mut members = Vec::new();
    for (room, _) in &rooms {
        for (i, e) in edges.iter().enumerate() {
            for _ in 0..2 {
                let mut ws = connect(&e.url(&format!("?room={room}")), None).await;
                assert_eq!(expect_joined(&mut ws, room).await, 0);
                members.push((room.clone(), i, ws));
            }
        }
    }
    // Gifts published through every edge, to every room.
    const GIFTS: u64 = 20;
    for n in 0..GIFTS {
        for (r, (room, _)) in rooms.iter().enumerate() {
            let seq = publish_gift(&pubs[(n as usize + r) % 3], room, n).await;
            assert_eq!(seq, n + 1, "{room}: one seq space across edges");
        }
    }
    for (room, edge, ws) in &mut members {
        let got = read_seqs(ws, GIFTS as usize, &format!("{room} on edge {edge}")).await;
        assert_eq!(got, (1..=GIFTS).collect::<Vec<_>>(), "{room} on edge {edge}: every gift once, in order");
    }
    // Health per node, on /healthz and /metrics.
    let (code, body) = pubs[0].get("/healthz").await;
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, h["bus"].as_str()), (200, Some("up")), "{h}");
    let nodes = h["redis_nodes"].as_array().expect("redis_nodes");
    assert_eq!(nodes.len(), 6, "{h}");
    assert_eq!(nodes.iter().filter(|n| n["role"] == "primary").count(), 3, "{h}");
    assert!(nodes.iter().all(|n| n["up"] == true), "{h}");
    assert_eq!(nodes.iter().map(|n| n["slots"].as_u64().unwrap()).sum::<u64>(), 16384, "{h}");
    assert_eq!(metric(&pubs[1], "roomcast_redis_node_up").await, 6.0);
    assert_eq!(metric(&pubs[1], "roomcast_bus_up").await, 1.0);
    // Dispatch works over the cluster (load reports in Redis): it knows all three edges.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let mut set = BTreeSet::new();
            for _ in 0..30 {
                let (status, body) = pubs[2].get("/v1/route?room=x").await;
                if status == 200 {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    set.insert(v["edge"].as_str().unwrap().to_owned());
                }
            }
            set.len() == 3
        })
        .await,
        "dispatch answers with all three edges"
    );
    // Room figures (online count over the edges) come from the cluster too.
    let (code, body) = pubs[0].get(&format!("/v1/rooms/{}", rooms[0].0)).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, v["seq"].as_u64()), (200, Some(GIFTS)), "{v}");
}

/// Members of `room` on every edge that read until `stop` and `want` say they have it all.
fn spawn_members(
    edges: &[EdgeProc],
    room: &str,
    per_edge: usize,
    want: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Vec<tokio::task::JoinHandle<Vec<u64>>> {
    let mut out = Vec::new();
    for e in edges {
        for _ in 0..per_edge {
            let (url, room) = (e.url(&format!("?room={room}")), room.to_owned());
            let want = want.clone();
            out.push(tokio::spawn(async move {
                let mut ws = connect(&url, None).await;
                expect_joined(&mut ws, &room).await;
                let mut seen = Vec::new();
                let end = std::time::Instant::now() + Duration::from_secs(90);
                loop {
                    let w = want.load(std::sync::atomic::Ordering::Relaxed);
                    if seen.last().is_some_and(|&s| s >= w) {
                        return seen;
                    }
                    assert!(std::time::Instant::now() < end, "{room}: only {seen:?}");
                    match tokio::time::timeout(Duration::from_millis(200), next_msg(&mut ws)).await {
                        Err(_) => {}
                        Ok(Some(ServerMsg::Batch { messages, .. })) => seen.extend(messages.iter().map(|m| m.seq)),
                        // The failover fence's skip (and what a lost primary numbered
                        // alone) is announced as a gap: checked against the acknowledged
                        // gifts by the caller, which sees them in `seen` or not at all.
                        Ok(Some(ServerMsg::Gap { .. })) => {}
                        Ok(other) => panic!("{room}: {other:?} after {seen:?}"),
                    }
                }
            }));
        }
    }
    out
}

/// Moves slots with live traffic (`redis-cli --cluster reshard`, the operator's tool): the
/// room's slot leaves its primary, whose server unsubscribes the edges (`sunsubscribe` push);
/// they follow the slot to its new owner, read the room again and fill from the stream what
/// was published meanwhile. Every gift reaches every member once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_a_hot_rooms_slot_loses_no_gift() {
    let cluster = RedisCluster::start(3, 1);
    let edges: Vec<EdgeProc> = (0..2).map(|_| edge_on(&cluster)).collect();
    let pubs: Vec<Publisher> = edges.iter().map(|e| Publisher::new(e.http)).collect();
    // A room in the first 200 slots of the primary serving slot 0: reshard moves a source's
    // slots from its lowest.
    let room =
        (0..100_000).map(|i| format!("hot-{i}")).find(|r| slot_of(r.as_bytes()) < 200).expect("a name in slots 0..200");
    let slot = slot_of(room.as_bytes());
    let (from, to) = (cluster.owner_of(0), cluster.owner_of(16383));
    let want = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let members = spawn_members(&edges, &room, 3, want.clone());
    // Let them join before traffic starts.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let (_, body) = pubs[0].get(&format!("/v1/rooms/{room}")).await;
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["online"].as_u64() == Some(6))
        })
        .await,
        "members joined"
    );
    let publisher = {
        let (pubs, room) = (pubs.clone(), room.clone());
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..300u64 {
                seqs.push(publish_gift(&pubs[n as usize % 2], &room, n).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seqs
        })
    };
    // Reshard while gifts flow: some numbered already, most still to come.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let (_, body) = pubs[0].get(&format!("/v1/rooms/{room}")).await;
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["seq"].as_u64() >= Some(30))
        })
        .await,
        "gifts flow"
    );
    let id = |port: u16| redis_cli(port, &["CLUSTER", "MYID"]).trim().to_owned();
    let (from_id, to_id) = (id(from), id(to));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id, "--cluster-slots", "200", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster reshard")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "reshard: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(cluster.owner_of(slot), to, "the room's slot moved");
    let seqs = publisher.await.unwrap();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>(), "one seq space across the move");
    want.store(300, std::sync::atomic::Ordering::Relaxed);
    for (i, m) in members.into_iter().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(30), m).await.expect("member finished").unwrap();
        assert_eq!(seen, seqs, "member {i}: every gift once, in order");
    }
}

/// Publishes gift `n` with the Idempotency-Key `g-n`, retrying every refusal and failed request
/// (as a publisher that must not lose a gift does) until it is acknowledged. Returns the seq.
async fn publish_until_acked(pubs: &[Publisher], room: &str, n: u64) -> u64 {
    let body = json!({ "kind": "gift", "body": { "n": n } }).to_string();
    let key = format!("g-{n}");
    let end = std::time::Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        let p = &pubs[(n as usize + attempt) % pubs.len()];
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            p.publish_with(room, "gift", json!({ "n": n }), &[("Idempotency-Key", key.as_str())]),
        )
        .await;
        if let Ok((200, _, v)) = r {
            return v["seq"].as_u64().unwrap();
        }
        assert!(std::time::Instant::now() < end, "gift {n} never acknowledged: {r:?} ({body})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// Each member's (seq, n) in the order received.
fn spawn_gift_members(
    edges: &[EdgeProc],
    room: &str,
    per_edge: usize,
    want: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Vec<tokio::task::JoinHandle<Vec<(u64, u64)>>> {
    let mut out = Vec::new();
    for e in edges {
        for _ in 0..per_edge {
            let (url, room) = (e.url(&format!("?room={room}")), room.to_owned());
            let want = want.clone();
            out.push(tokio::spawn(async move {
                let mut ws = connect(&url, None).await;
                expect_joined(&mut ws, &room).await;
                let mut seen: Vec<(u64, u64)> = Vec::new();
                let end = std::time::Instant::now() + Duration::from_secs(120);
                loop {
                    let w = want.load(std::sync::atomic::Ordering::Relaxed);
                    if seen.last().is_some_and(|&(s, _)| s >= w) {
                        return seen;
                    }
                    assert!(std::time::Instant::now() < end, "{room}: only {seen:?}");
                    match tokio::time::timeout(Duration::from_millis(200), next_msg(&mut ws)).await {
                        Err(_) => {}
                        Ok(Some(ServerMsg::Batch { messages, .. })) => {
                            for m in messages {
                                let body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
                                seen.push((m.seq, body["n"].as_u64().unwrap()));
                            }
                        }
                        // The failover fence's skip (and what a lost primary numbered
                        // alone) is announced as a gap: checked against the acknowledged
                        // gifts by the caller, which sees them in `seen` or not at all.
                        Ok(Some(ServerMsg::Gap { .. })) => {}
                        Ok(other) => panic!("{room}: {other:?} after {seen:?}"),
                    }
                }
            }));
        }
    }
    out
}

/// The primary that owns a hot room's slot is killed mid-stream (SIGKILL). With
/// `bus.min_replicas_acked = 1` a gift is acknowledged only once its replica holds it, so the
/// replica that takes over has every acknowledged gift: the publisher retries what was not
/// acknowledged (same Idempotency-Key), the edges follow the slot to the new primary and fill
/// from its stream. Every member gets every acknowledged gift exactly once, in order, each seq
/// with the gift it was acknowledged for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_hot_rooms_primary_loses_no_acknowledged_gift() {
    let mut cluster = RedisCluster::start(3, 1);
    let url = cluster.url();
    let edges: Vec<EdgeProc> = (0..3)
        .map(|_| {
            EdgeProc::start(&[
                "--shards",
                "1",
                "--merge-window-ms",
                "10",
                "--bus",
                url.as_str(),
                "--min-replicas-acked",
                "1",
            ])
        })
        .collect();
    let pubs: Vec<Publisher> = edges.iter().map(|e| Publisher::new(e.http)).collect();
    let room = "hot";
    let primary = cluster.owner_of(slot_of(room.as_bytes()));
    let want = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let members = spawn_gift_members(&edges, room, 2, want.clone());
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let (_, body) = pubs[0].get(&format!("/v1/rooms/{room}")).await;
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["online"].as_u64() == Some(6))
        })
        .await,
        "members joined"
    );
    const GIFTS: u64 = 300;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publisher = {
        let (pubs, acked) = (pubs.clone(), acked.clone());
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..GIFTS {
                seqs.push((publish_until_acked(&pubs, room, n).await, n));
                acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seqs
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || async { acked.load(std::sync::atomic::Ordering::Relaxed) >= 100 }).await
    );
    // On loopback the replica keeps up, so this run passes without bus.min_replicas_acked too
    // (tried: stopping the replica first does not open a window, the kernel's socket buffers
    // take the stream); that the setting refuses what no replica holds is shown on one Redis
    // (tests/cluster.rs, gifts_wait_for_a_replica_on_one_redis). What this checks is the path:
    // failover, following the slot, filling, and acknowledged gifts all there, once.
    cluster.kill(primary);
    let at_kill = acked.load(std::sync::atomic::Ordering::Relaxed);
    // Its replica takes over; the old primary comes back as the new one's replica (without a
    // replica the new primary cannot acknowledge gifts: min_replicas_acked = 1).
    assert!(
        wait_until(Duration::from_secs(30), || async {
            cluster.owner(slot_of(room.as_bytes())).is_some_and(|p| p != primary)
        })
        .await,
        "failover"
    );
    // The promoted replica has no replica of its own: it acknowledges no gift, and /healthz
    // says so (a trial found it saying "ok" while that primary's rooms got 503).
    let says_why = wait_until(Duration::from_secs(10), || async {
        let (_, body) = pubs[0].get("/healthz").await;
        body.contains("fewer than bus.min_replicas_acked") && body.contains("\"degraded\"")
    })
    .await;
    assert!(says_why, "{}", pubs[0].get("/healthz").await.1);
    cluster.restart(primary);
    let gifts = publisher.await.unwrap();
    assert!(at_kill < GIFTS, "the primary died mid-stream");
    let seqs: Vec<u64> = gifts.iter().map(|&(s, _)| s).collect();
    // Dense but for the failover fence: the promoted replica moved the room's seq on once.
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "every gift acknowledged once, in order: {seqs:?}");
    let jumps: Vec<&[u64]> = seqs.windows(2).filter(|w| w[1] != w[0] + 1).collect();
    assert!(
        jumps.len() == 1 && jumps[0][1] - jumps[0][0] > edge::bus::redis::FAILOVER_SEQ_SKIP,
        "one fence jump at the failover: {jumps:?}"
    );
    want.store(*seqs.last().unwrap(), std::sync::atomic::Ordering::Relaxed);
    for (i, m) in members.into_iter().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(60), m).await.expect("member finished").unwrap();
        assert_eq!(seen, gifts, "member {i}: every acknowledged gift once, in order, as acknowledged");
    }
    // The edges saw the node go and come back.
    let (_, body) = pubs[0].get("/healthz").await;
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    let old = format!("127.0.0.1:{primary}");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let (_, body) = pubs[0].get("/healthz").await;
            let h: serde_json::Value = serde_json::from_str(&body).unwrap();
            h["redis_nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["node"] == old.as_str() && n["role"] == "replica" && n["up"] == true)
        })
        .await,
        "the old primary is back as a replica: {h}"
    );
}

/// The cost of `bus.min_replicas_acked`: a gift's publish latency with and without waiting for
/// a replica, on the same cluster (loopback, one replica per primary). Printed; recorded in
/// ARCHITECTURE.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_gifts_cost_one_replication_round_trip() {
    let cluster = RedisCluster::start(3, 1);
    let url = cluster.url();
    let plain = EdgeProc::start(&["--shards", "1", "--bus", url.as_str()]);
    let waited = EdgeProc::start(&["--shards", "1", "--bus", url.as_str(), "--min-replicas-acked", "1"]);
    let mut report = Vec::new();
    for (i, (name, e)) in [("min_replicas_acked=0", &plain), ("min_replicas_acked=1", &waited)].into_iter().enumerate()
    {
        let p = Publisher::new(e.http);
        for n in 0..50 {
            publish_gift(&p, &format!("warm-{i}"), n).await;
        }
        let mut lat = Vec::new();
        for n in 0..500u64 {
            let t = std::time::Instant::now();
            // A 503 (a busy machine past the replicas' timeout) is retried, and counted in.
            publish_gift(&p, &format!("lat-{i}-{}", n % 30), n).await;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        let q = |f: f64| lat[((lat.len() as f64 - 1.0) * f) as usize];
        report.push(format!("{name}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms", q(0.5), q(0.99), q(1.0)));
    }
    let (_, text) = Publisher::new(waited.http).get("/metrics").await;
    assert!(text.contains("roomcast_redis_replicated_publish_seconds_count 5"), "waited publishes measured");
    eprintln!("gift publish latency over HTTP (30 rooms on 3 primaries):\n  {}", report.join("\n  "));
}

/// `--bus redis://` naming a node of a Redis Cluster is refused at start with what to use
/// instead (a trial found such an edge up, /healthz "bus up", and every publish to a slot the
/// node does not own answered 503).
#[test]
fn a_single_redis_url_at_a_cluster_node_is_refused_at_start() {
    let cluster = RedisCluster::start(3, 0);
    let url = format!("redis://127.0.0.1:{}", cluster.any_port());
    let out = std::process::Command::new(edge_bin())
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--no-store", "--bus", url.as_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("redis-cluster://"), "says what to use: {err}");
}

/// The node's port that replicates `primary` (as `CLUSTER NODES` says).
fn replica_of(cluster: &RedisCluster, primary: u16) -> u16 {
    let id = redis_cli(primary, &["CLUSTER", "MYID"]).trim().to_owned();
    for line in redis_cli(cluster.any_port(), &["CLUSTER", "NODES"]).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 3 && f[2].contains("slave") && f[3] == id {
            let addr = f[1].split('@').next().unwrap();
            return addr.rsplit_once(':').unwrap().1.parse().unwrap();
        }
    }
    panic!("no replica of {primary}");
}

/// With `min-replicas-to-write 1` (as the docs ask) the primary holding the load-report index
/// loses its replica: it refuses writes, but dispatch keeps routing (liveness is each report's
/// own, the index only lists edges), and the bans in force can still be loaded (a read). A
/// trial found `/v1/route` answering 503 "no healthy edge" on every edge for every room. Both
/// edges' report keys are on that primary too (CI hit this by chance, one run in nine: dispatch
/// answered "no edge has reported"): each report has a second copy in a slot half the space
/// away, on another primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_keeps_routing_when_the_index_primary_refuses_writes() {
    let mut cluster = RedisCluster::start(3, 1);
    for (port, _, _) in &cluster.nodes {
        redis_cli(*port, &["CONFIG", "SET", "min-replicas-to-write", "1"]);
    }
    let url = cluster.url();
    let index_primary = cluster.owner_of(slot_of(edge::dispatch::registry::EDGES.as_bytes()));
    let ids: Vec<String> = (0..1000)
        .map(|i| format!("edge-{i}"))
        .filter(|id| cluster.owner_of(slot_of(edge::dispatch::registry::key(id).as_bytes())) == index_primary)
        .take(2)
        .collect();
    let edges: Vec<EdgeProc> = ids
        .iter()
        .map(|id| {
            let cfg = config(&format!("index-{id}"), &format!("edge_id = \"{id}\"\n"));
            EdgeProc::start(&["--shards", "1", "--bus", url.as_str(), "--min-replicas-acked", "1", "--config", &cfg])
        })
        .collect();
    let pubs: Vec<Publisher> = edges.iter().map(|e| Publisher::new(e.http)).collect();
    let routed = |p: &Publisher| {
        let p = p.clone();
        async move { p.get("/v1/route?room=r0").await.0 == 200 }
    };
    assert!(wait_until(Duration::from_secs(10), || routed(&pubs[0])).await, "routing before");
    cluster.kill(replica_of(&cluster, index_primary));
    // Past several report lifetimes (3 s) with the index unwritable.
    assert!(
        wait_until(Duration::from_secs(20), || async {
            let (_, body) = pubs[0].get("/healthz").await;
            body.contains(&format!("127.0.0.1:{index_primary} has 0 replicas up"))
        })
        .await,
        "the edge sees the primary without its replica"
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    for p in &pubs {
        let (status, body) = p.get("/v1/route?room=r0").await;
        assert_eq!(status, 200, "{body}");
    }
}
