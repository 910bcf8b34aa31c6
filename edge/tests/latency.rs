//! What users feel, measured by the edge: delivery latency from a message's arrival at its room's
//! batch (so the merge window counts) to the completion of the write to each member (sampled),
//! by class, and each shard's capacity (frames per CPU-second).

use std::time::Duration;

use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;

/// One metric's value for the series whose labels contain `labels`.
async fn series(p: &Publisher, name: &str, labels: &str) -> f64 {
    let (_, text) = p.get("/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_latency_and_capacity_are_measured() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "0"]);
    let p = Publisher::new(edge.http);
    let mut members = Vec::new();
    for _ in 0..8 {
        let mut ws = connect(&edge.url("?room=lat"), None).await;
        expect_joined(&mut ws, "lat").await;
        members.push(ws);
    }
    // 80 gifts, then 80 chats, to 8 members: 640 frames of each class, about 40 of each sampled
    // (1 in 16 at random; fewer than 10 has a chance under 10^-8). One class after the other:
    // interleaved, a chat published while a gift's batch waited for the store shared its frame,
    // and such a frame counts as must-deliver (one run saw 4 droppable samples).
    for kind in ["gift", "chat"] {
        for n in 0..80 {
            p.publish("lat", kind, json!({ "n": n })).await;
        }
        for ws in &mut members {
            let mut got = 0;
            while got < 80 {
                match next_msg_within(ws, Duration::from_secs(10)).await {
                    Some(ServerMsg::Batch { messages, .. }) => got += messages.len(),
                    Some(_) => {}
                    None => panic!("only {got} of 80 {kind} messages"),
                }
            }
        }
    }
    let must = series(&p, "roomcast_delivery_latency_seconds_count", "class=\"must_deliver\"").await;
    let chat = series(&p, "roomcast_delivery_latency_seconds_count", "class=\"droppable\"").await;
    assert!(must >= 10.0 && chat >= 10.0, "sampled 1 in 16 of 640 frames each: {must} {chat}");
    // By kind too, edge-wide (one series per kind, no shard label).
    let gift_k = series(&p, "roomcast_delivery_latency_kind_seconds_count", "kind=\"gift\"").await;
    let chat_k = series(&p, "roomcast_delivery_latency_kind_seconds_count", "kind=\"chat\"").await;
    assert!(gift_k >= 10.0 && chat_k >= 10.0, "per kind, the same sampled frames: {gift_k} {chat_k}");
    let sum = series(&p, "roomcast_delivery_latency_seconds_sum", "class=\"must_deliver\"").await;
    assert!(sum / must < 5.0, "mean latency on loopback is well under 5 s: {}", sum / must);
    // The capacity estimate updates on the shards' timers (every 250 ms).
    let measured =
        wait_until(Duration::from_secs(5), || async { series(&p, "roomcast_shard_busy_ratio", "shard=").await > 0.0 })
            .await;
    assert!(measured, "the busy share is measured");
    // The dashboard's source has them too: cumulative counts per class, capacity per shard.
    let (_, k) = p.get("/v1/kernel").await;
    let k: serde_json::Value = serde_json::from_str(&k).unwrap();
    let counts = k["delivery"]["cumulative"]["must_deliver"].as_array().unwrap();
    assert_eq!(counts.len(), k["delivery"]["bounds_s"].as_array().unwrap().len() + 1);
    assert!(counts.last().unwrap().as_u64().unwrap() >= 10);
    assert_eq!(k["delivery"]["shards"].as_array().unwrap().len(), 2);
    let gifts = k["delivery"]["kinds"]["gift"].as_array().unwrap();
    assert_eq!(gifts.len(), counts.len());
    assert!(gifts.last().unwrap().as_u64().unwrap() >= 10);
    let (_, page) = p.get("/dashboard").await;
    assert!(page.contains("Delivery latency at the edge"));
    assert!(page.contains("p99 by kind"));
    let (status, js) = p.get("/dashboard/uplot.js").await;
    assert_eq!(status, 200, "the chart library is served from the binary");
    assert!(js.contains("uPlot"));
    assert!(k["totals"]["messages_in"].as_f64().unwrap() >= 160.0, "{}", k["totals"]);
    assert_eq!(k["top_rooms"][0]["room"], "lat");
    assert_eq!(k["top_rooms"][0]["members"], 8);
    assert!(k["top_rooms"][0]["sampling_visible_rate"].is_null(), "a room of 8 is not sampled");
}

/// The merge window is part of what a member waits: with a 300 ms window, a gift alone in its
/// batch is measured at 300 ms or more, never at the few milliseconds from flush to write (the
/// controller steers on this figure; measured from the flush, it missed the window and left
/// hot rooms merging over 2 s with gift p99 at 2.5 s against a 2 s target).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_latency_includes_the_merge_window() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "300"]);
    let p = Publisher::new(edge.http);
    let mut members = Vec::new();
    for _ in 0..32 {
        let mut ws = connect(&edge.url("?room=win"), None).await;
        expect_joined(&mut ws, "win").await;
        members.push(ws);
    }
    // Ten gifts, each alone in its batch: 320 frames, about 20 sampled (fewer than 5 has a
    // chance near 10^-5).
    for n in 0..10 {
        p.publish("win", "gift", json!({ "n": n })).await;
        for ws in &mut members {
            match next_msg_within(ws, Duration::from_secs(10)).await {
                Some(ServerMsg::Batch { messages, .. }) => assert_eq!(messages.len(), 1),
                other => panic!("expected gift {n}, got {other:?}"),
            }
        }
    }
    let count = series(&p, "roomcast_delivery_latency_seconds_count", "class=\"must_deliver\"").await;
    assert!(count >= 5.0, "sampled 1 in 16 of 320 frames: {count}");
    let (_, text) = p.get("/metrics").await;
    let early: f64 = text
        .lines()
        .filter(|l| l.starts_with("roomcast_delivery_latency_seconds_bucket"))
        .filter(|l| l.contains("class=\"must_deliver\"") && l.contains("le=\"0.2\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(early, 0.0, "no gift is measured under its 300 ms window");
}

/// Each kind is timed from its own oldest message in the frame: a chat that opens a 1 s window
/// and a gift published 250 ms later go out in one frame; the chat is measured at the whole
/// window (the class figure counts that frame as must-deliver, from the gift, and shows no
/// chat at all), the gift 250 ms less on every sampled frame. Before per-kind timing there was
/// no chat figure for mixed frames, and a per-kind figure taken from the batch's oldest message
/// would give the gift the chat's second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_is_timed_from_its_own_arrival() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "1000"]);
    let p = Publisher::new(edge.http);
    let mut members = Vec::new();
    for _ in 0..32 {
        let mut ws = connect(&edge.url("?room=kinds"), None).await;
        expect_joined(&mut ws, "kinds").await;
        members.push(ws);
    }
    // Six rounds of one mixed frame to 32 members: 192 frames, about 12 sampled (none has a
    // chance near 4 x 10^-6).
    for n in 0..6 {
        p.publish("kinds", "chat", json!(n)).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        p.publish("kinds", "gift", json!({ "n": n })).await;
        for ws in &mut members {
            loop {
                match next_msg_within(ws, Duration::from_secs(10)).await {
                    // An online count alone (the joins changed it) is not this round's frame.
                    Some(ServerMsg::Batch { messages, .. }) if messages.is_empty() => {}
                    Some(ServerMsg::Batch { messages, .. }) => {
                        assert_eq!(messages.len(), 2, "chat and gift in one frame");
                        break;
                    }
                    other => panic!("expected round {n}, got {other:?}"),
                }
            }
        }
    }
    let count = |kind: &'static str| {
        let p = &p;
        async move { series(p, "roomcast_delivery_latency_kind_seconds_count", &format!("kind=\"{kind}\"")).await }
    };
    let sum = |kind: &'static str| {
        let p = &p;
        async move { series(p, "roomcast_delivery_latency_kind_seconds_sum", &format!("kind=\"{kind}\"")).await }
    };
    let (chats, gifts) = (count("chat").await, count("gift").await);
    assert!(chats >= 3.0, "sampled 1 in 16 of 192 frames: {chats}");
    assert_eq!(chats, gifts, "every sampled frame carries both kinds");
    let droppable = series(&p, "roomcast_delivery_latency_seconds_count", "class=\"droppable\"").await;
    assert_eq!(droppable, 0.0, "by class, a frame with a gift is must-deliver");
    let (_, text) = p.get("/metrics").await;
    let early: f64 = text
        .lines()
        .filter(|l| l.starts_with("roomcast_delivery_latency_kind_seconds_bucket{kind=\"chat\",le=\"0.75\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(early, 0.0, "no chat is measured under its window");
    let (chat_s, gift_s) = (sum("chat").await, sum("gift").await);
    assert!(
        chat_s - gift_s >= 0.24 * chats,
        "the gift from its own arrival, 250 ms later: chat {chat_s} s, gift {gift_s} s"
    );
}
