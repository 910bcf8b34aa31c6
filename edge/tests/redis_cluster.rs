//! Several edges on a real Redis Cluster (issue #16): 6 redis-server processes (3 primaries,
//! 3 replicas) made by `redis-cli --cluster create`, started by each test on free loopback ports
//! in a temporary directory and killed when it ends (also on failure).

mod util;

use std::collections::BTreeSet;
use std::time::Duration;

use edge::bus::slots::slot_of;
use roomcast_proto::envelope::ServerMsg;
use serde_json::json;
use util::*;

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

/// Publishes a gift, retrying while the bus is unavailable (503): the publisher's side of "no
/// acknowledged gift lost".
async fn publish_gift(p: &Publisher, room: &str, n: u64) -> u64 {
    let body = json!({ "kind": "gift", "body": { "n": n } }).to_string().into_bytes();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = p.post_raw(&format!("/v1/rooms/{room}/messages"), body.clone()).await;
        match status {
            200 => return v["seq"].as_u64().unwrap(),
            503 if std::time::Instant::now() < end => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => panic!("publish failed: {status} {v}"),
        }
    }
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
