//! Delivery guarantees: gifts survive floods and slow readers, `since` recovery is exact.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;

/// Reads batches until `done` says so or the deadline passes; returns (seq, kind) in order.
async fn read_until(ws: &mut Ws, d: Duration, mut done: impl FnMut(&[(u64, String)]) -> bool) -> Vec<(u64, String)> {
    let end = Instant::now() + d;
    let mut got = Vec::new();
    while !done(&got) {
        let left = end.saturating_duration_since(Instant::now());
        match next_msg_within(ws, left).await {
            Some(ServerMsg::Batch { messages, .. }) => got.extend(messages.into_iter().map(|m| (m.seq, m.kind))),
            Some(_) => {}
            None => break,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gifts_survive_a_chat_flood_past_the_limit() {
    let cfg =
        config("flood", "[limits]\nroom_rate = 50.0\nroom_burst = 50.0\nuser_rate = 1000.0\nuser_burst = 1000.0\n");
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "20", "--config", &cfg]);
    let publisher = Publisher::new(edge.http);
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut ws = connect(&edge.url("?room=flood"), None).await;
        expect_joined(&mut ws, "flood").await;
        clients.push(ws);
    }
    let (mut gifts, mut chats, mut limited) = (BTreeSet::new(), BTreeSet::new(), 0);
    for n in 0..600 {
        let kind = if n % 30 == 0 { "gift" } else { "chat" };
        let body = json!({ "kind": kind, "user": format!("u{}", n % 7), "body": n }).to_string();
        let (status, v) = publisher.post_raw("/v1/rooms/flood/messages", body.into_bytes()).await;
        match (status, kind) {
            (200, "gift") => {
                gifts.insert(v["seq"].as_u64().unwrap());
            }
            (200, _) => {
                chats.insert(v["seq"].as_u64().unwrap());
            }
            (429, "chat") => {
                assert_eq!(v["dropped"], json!(true));
                limited += 1;
            }
            other => panic!("unexpected answer {other:?}: {v}"),
        }
    }
    assert_eq!(gifts.len(), 20, "gifts are never rate limited at this rate");
    assert!(limited > 300, "chat was cut to the limit ({limited} refused)");
    assert!(chats.len() < 300, "{} chats accepted", chats.len());
    let total = gifts.len() + chats.len();
    let results =
        join_all(clients.iter_mut().map(|ws| read_until(ws, Duration::from_secs(20), move |g| g.len() >= total))).await;
    for got in results {
        let gift_seqs: BTreeSet<u64> = got.iter().filter(|g| g.1 == "gift").map(|g| g.0).collect();
        assert_eq!(gift_seqs, gifts, "every client gets every gift");
        let chat_seqs: BTreeSet<u64> = got.iter().filter(|g| g.1 == "chat").map(|g| g.0).collect();
        assert_eq!(chat_seqs, chats, "and exactly the accepted chat");
    }
    assert!(metric(&publisher, "roomcast_messages_dropped_total").await >= f64::from(limited));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_recovery_has_no_gap_and_no_duplicate_at_the_seam() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "10"]);
    let publisher = std::sync::Arc::new(Publisher::new(edge.http));
    let mut ws = connect(&edge.url("?room=seam"), None).await;
    expect_joined(&mut ws, "seam").await;
    for n in 0..10 {
        publisher.publish("seam", "gift", json!(n)).await;
    }
    let first = read_until(&mut ws, Duration::from_secs(10), |g| g.len() >= 10).await;
    let last_seen = first.last().unwrap().0;
    drop(ws);
    // Missed while away: gifts and chat.
    for n in 0..10 {
        publisher.publish("seam", if n % 2 == 0 { "gift" } else { "chat" }, json!(n)).await;
    }
    // Keep publishing gifts while the client reconnects: some land in the replay, some live.
    let p2 = publisher.clone();
    let flow = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for n in 0..40 {
            seqs.push(p2.publish("seam", "gift", json!(n)).await);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seqs
    });
    let mut ws = connect(&edge.url(&format!("?room=seam&since={last_seen}")), None).await;
    let joined = expect_joined(&mut ws, "seam").await;
    let live_seqs = flow.await.unwrap();
    let last = *live_seqs.last().unwrap();
    let got = read_until(&mut ws, Duration::from_secs(10), |g| g.last().is_some_and(|x| x.0 >= last)).await;
    let gifts: Vec<u64> = got.iter().filter(|g| g.1 == "gift").map(|g| g.0).collect();
    // Missed gifts are last_seen+1, +3, ... +9; then every live gift.
    let mut want: Vec<u64> = (0..10).filter(|n| n % 2 == 0).map(|n| last_seen + 1 + n).collect();
    want.extend(&live_seqs);
    assert_eq!(gifts, want, "every gift after since, once, in order (joined at {joined})");
    // Chat missed while away is not replayed (droppable); chat is only live.
    assert!(got.iter().filter(|g| g.1 == "chat").all(|g| g.0 > joined));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_older_than_history_is_told_explicitly() {
    let cfg = config("gap", "[history]\nmust_deliver = 5\n");
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0", "--config", &cfg]);
    let publisher = Publisher::new(edge.http);
    for n in 0..20 {
        publisher.publish("old", "gift", json!(n)).await;
    }
    let mut ws = connect(&edge.url("?room=old&since=0"), Some("roomcast.rkyv.v2")).await;
    assert_eq!(expect_joined(&mut ws, "old").await, 20);
    assert_eq!(
        next_msg_within(&mut ws, Duration::from_secs(5)).await,
        Some(ServerMsg::Gap { room: "old".into(), from: 1, to: 15 })
    );
    let got = read_until(&mut ws, Duration::from_secs(5), |g| g.len() >= 5).await;
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![16, 17, 18, 19, 20]);
    // The room stats say the same.
    let (status, body) = publisher.get("/v1/rooms/old").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["seq"].as_u64(), v["history_must_deliver"].as_u64(), v["history_evicted_upto"].as_u64()),
        (Some(20), Some(5), Some(15))
    );
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// A client that upgrades and then never reads, with a tiny receive buffer.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_cut_off_while_fast_readers_keep_up_then_recovers() {
    let cfg = config("slow", "[send]\nmax_queue_bytes = 262144\n[fanout]\nmax_batch_bytes = 16384\n");
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "5", "--config", &cfg]);
    let publisher = Publisher::new(edge.http);
    let slow = never_reader(edge.ws, "slow").await;
    let mut fast = Vec::new();
    for _ in 0..500 {
        let mut ws = connect(&edge.url("?room=slow"), Some("roomcast.rkyv.v2")).await;
        expect_joined(&mut ws, "slow").await;
        fast.push(ws);
    }
    // Readers stop at the sentinel gift, published last.
    let sentinel = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut ws| {
            let sentinel = sentinel.clone();
            tokio::spawn(async move {
                read_until(&mut ws, Duration::from_secs(90), |g| {
                    g.last().is_some_and(|x| x.0 >= sentinel.load(std::sync::atomic::Ordering::Relaxed))
                })
                .await
            })
        })
        .collect();
    let rss_before = rss_kb(edge.child.id());
    let big = "g".repeat(4000);
    let mut gifts = Vec::new();
    // Publish until the edge cuts the reader that never reads: its kernel buffers absorb a little
    // first (the edge's fixed SO_SNDBUF, the reader's 4 KiB receive buffer), then its queue
    // passes 256 KiB.
    let mut cut = false;
    for n in 0..3000 {
        gifts.push(publisher.publish("slow", "gift", json!({ "n": n, "pad": big })).await);
        publisher.publish("slow", "chat", json!(n)).await;
        if n % 50 == 49 && metric(&publisher, "roomcast_slow_consumer_closes_total").await >= 1.0 {
            cut = true;
            break;
        }
    }
    assert!(cut, "the reader that never reads is cut off");
    let last = publisher.publish("slow", "gift", json!("end")).await;
    gifts.push(last);
    sentinel.store(last, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        let got = r.await.unwrap();
        let g: Vec<u64> = got.iter().filter(|x| x.1 == "gift").map(|x| x.0).collect();
        assert_eq!(g, gifts, "fast readers get every gift in order");
    }
    let rss_after = rss_kb(edge.child.id());
    // Bound: 501 connections x 256 KiB queue = 128 MiB worst case, plus history (10,000 gifts
    // of 4 KB = 40 MiB). The edge must stay below their sum.
    assert!(rss_after < rss_before + 168 * 1024, "RSS grew from {rss_before} kB to {rss_after} kB");
    drop(slow);
    // It reconnects with since = the seq it had joined at (it never read) and gets every gift.
    let mut ws = connect(&edge.url("?room=slow&since=0"), None).await;
    expect_joined(&mut ws, "slow").await;
    let want = gifts.len();
    let got = read_until(&mut ws, Duration::from_secs(20), |g| g.len() >= want).await;
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), gifts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_widens_the_window_and_gifts_still_arrive_in_time() {
    let cfg = config(
        "adapt",
        "[adaptive]\nhigh_water_bytes = 65536\nlow_water_bytes = 1024\nmax_window_ms = 800\n[send]\nmax_queue_bytes = 16777216\nmax_queue_frames = 100000\n",
    );
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "50", "--config", &cfg]);
    let publisher = Publisher::new(edge.http);
    // Readers that never read build a backlog on the shard.
    let mut stuck = Vec::new();
    for _ in 0..20 {
        stuck.push(never_reader(edge.ws, "hot").await);
    }
    let mut ws = connect(&edge.url("?room=hot"), None).await;
    expect_joined(&mut ws, "hot").await;
    let pad = "p".repeat(4000);
    let mut sent_at = std::collections::HashMap::new();
    let mut widened = false;
    for n in 0..150 {
        let seq = publisher.publish("hot", "gift", json!({ "n": n, "pad": pad })).await;
        sent_at.insert(seq, Instant::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
        if n % 10 == 9 {
            let (_, body) = publisher.get("/v1/rooms/hot").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            widened |= v["window_ms"].as_u64().unwrap_or(0) > 50;
        }
    }
    assert!(widened, "the hot room's window widened while the shard was behind");
    let mut worst = Duration::ZERO;
    let mut seen = 0;
    while seen < 150 {
        match next_msg_within(&mut ws, Duration::from_secs(10)).await {
            Some(ServerMsg::Batch { messages, .. }) => {
                for m in messages {
                    worst = worst.max(sent_at[&m.seq].elapsed());
                    seen += 1;
                }
            }
            Some(_) => {}
            None => panic!("stream ended after {seen} gifts"),
        }
    }
    // Latency is measured at the end (an upper bound on each gift's): well inside 10 s.
    assert!(worst < Duration::from_secs(10), "{worst:?}");
    assert!(metric(&publisher, "roomcast_hot_room_merge_window_seconds").await >= 0.05);
    drop(stuck);
}
