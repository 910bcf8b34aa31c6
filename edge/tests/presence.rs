//! The online count: exact on one edge, summed over edges through Redis, pushed to members in
//! batches when it changes, in `joined`, and in `GET /v1/rooms/{room}` from any edge; a crashed
//! edge's members leave the total within the TTL.

use std::time::{Duration, Instant};

use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;

/// Reads until a batch shows `want` members (other traffic passes); the counts seen on the way.
async fn until_online(ws: &mut Ws, want: u64, within: Duration) -> Vec<u64> {
    let end = Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(m) = next_any_within(ws, end.saturating_duration_since(Instant::now())).await {
        if let ServerMsg::Batch { online: Some(n), .. } = m {
            seen.push(n);
            if n == want {
                return seen;
            }
        }
    }
    panic!("never saw online = {want}; saw {seen:?}");
}

async fn next_any_within(ws: &mut Ws, d: Duration) -> Option<ServerMsg> {
    tokio::time::timeout(d, next_any(ws)).await.ok().flatten()
}

async fn joined_online(ws: &mut Ws) -> Option<u64> {
    match next_msg_within(ws, Duration::from_secs(10)).await {
        Some(ServerMsg::Joined { online, .. }) => online,
        other => panic!("expected joined, got {other:?}"),
    }
}

async fn stats(p: &Publisher, room: &str) -> serde_json::Value {
    let (status, body) = p.get(&format!("/v1/rooms/{room}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_see_the_count_change_and_a_reconnect_storm_costs_one_push_per_interval() {
    let cfg = config("presence-one", "[presence]\ninterval_ms = 300\n");
    let edge = EdgeProc::start(&["--shards", "2", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    let mut a = connect(&edge.url("?room=live"), None).await;
    assert_eq!(joined_online(&mut a).await, Some(1), "the joiner is told the count at once");
    let mut b = connect(&edge.url("?room=live"), Some("roomcast.rkyv.v2")).await;
    assert_eq!(joined_online(&mut b).await, Some(2));
    assert_eq!(until_online(&mut a, 2, Duration::from_secs(5)).await.last(), Some(&2));

    // 50 joins and 50 leaves in a burst: members see at most a few counts, not 100.
    let mut storm = Vec::new();
    for _ in 0..50 {
        storm.push(connect(&edge.url("?room=live"), None).await);
    }
    drop(storm);
    // Whatever the storm's timing, members get few counts, the last of them 2 (or none, if
    // the storm came and went within one interval: the count they were shown still holds).
    let mut seen = Vec::new();
    let end = Instant::now() + Duration::from_secs(3);
    while let Some(m) = next_any_within(&mut a, end.saturating_duration_since(Instant::now())).await {
        if let ServerMsg::Batch { online: Some(n), .. } = m {
            seen.push(n);
        }
    }
    assert!(seen.len() <= 12, "one push per interval at most: {seen:?}");
    assert!(seen.last().is_none_or(|&n| n == 2), "{seen:?}");
    assert_eq!(stats(&p, "live").await["online"], 2);

    // (That a pending batch carries the count, serialized once with it, is the engine's unit
    // test `online_counts_are_pushed_on_change_at_most_once_per_interval`.)
    let c = connect(&edge.url("?room=live"), None).await;
    until_online(&mut a, 3, Duration::from_secs(5)).await;
    p.publish("live", "gift", serde_json::json!({ "n": 1 })).await;
    drop(c);
    assert_eq!(until_online(&mut b, 2, Duration::from_secs(5)).await.last(), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_summed_over_edges_and_a_crashed_edge_leaves_the_total() {
    let redis = RedisProc::start();
    let cfg = config("presence-cluster", "[presence]\ninterval_ms = 200\nttl_ms = 3000\n");
    let url = redis.url();
    let start = || EdgeProc::start(&["--shards", "1", "--bus", url.as_str(), "--config", &cfg]);
    let (mut e1, e2, e3) = (start(), start(), start());
    let p3 = Publisher::new(e3.http);
    let mut on1 = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&e1.url("?room=big"), None).await;
        joined_online(&mut ws).await;
        on1.push(ws);
    }
    let mut on2 = connect(&e2.url("?room=big"), None).await;
    joined_online(&mut on2).await;
    assert_eq!(until_online(&mut on2, 4, Duration::from_secs(10)).await.last(), Some(&4));
    p3.publish("big", "gift", serde_json::json!({ "n": 1 })).await;

    // An edge with no member of the room answers from Redis: the total, each edge's share,
    // and the room's numbering.
    let s = stats(&p3, "big").await;
    assert_eq!((s["online"].as_u64(), s["members"].as_u64(), s["seq"].as_u64()), (Some(4), Some(0), Some(1)), "{s}");
    let edges = s["online_edges"].as_object().unwrap();
    assert_eq!(edges.len(), 2, "{s}");
    assert_eq!(edges.values().filter_map(serde_json::Value::as_u64).sum::<u64>(), 4, "{s}");
    let (status, _) = p3.get("/v1/rooms/never-used").await;
    assert_eq!(status, 404);

    // A member on the third edge too; then the first edge crashes: its three members leave
    // the total once their counts expire (ttl 3 s), without any edge being told.
    let mut on3 = connect(&e3.url("?room=big"), None).await;
    joined_online(&mut on3).await;
    until_online(&mut on3, 5, Duration::from_secs(10)).await;
    e1.kill9();
    drop(on1);
    until_online(&mut on3, 2, Duration::from_secs(12)).await;
    until_online(&mut on2, 2, Duration::from_secs(5)).await;
    let s = stats(&p3, "big").await;
    assert_eq!((s["online"].as_u64(), s["members"].as_u64()), (Some(2), Some(1)), "{s}");

    // Leaving: the edge's count goes at once (not at its expiry).
    drop(on3);
    until_online(&mut on2, 1, Duration::from_secs(5)).await;
    drop(e2);
    drop(e3);
}
