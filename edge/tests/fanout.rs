//! Fan-out through the real edge: many clients, several rooms, merge windows, signalling.

use std::time::Duration;

use futures_util::future::join_all;
use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;

/// Collects batches until `count` messages arrived; returns (room, seq, kind) per message.
async fn collect(ws: &mut Ws, count: usize) -> Vec<(String, u64, String)> {
    let mut got = Vec::new();
    while got.len() < count {
        match next_msg_within(ws, Duration::from_secs(20)).await {
            Some(ServerMsg::Batch { room, messages, .. }) => {
                for m in messages {
                    got.push((room.clone(), m.seq, m.kind));
                }
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("stream ended after {} of {count} messages", got.len()),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_clients_two_rooms_every_message_once_in_order() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "20"]);
    let publisher = Publisher::new(edge.http);
    let rooms = ["alpha", "beta"];
    // 1,000 clients, alternating rooms and encodings.
    let clients = join_all((0..1000).map(|i| {
        let url = edge.url(&format!("?room={}", rooms[i % 2]));
        async move {
            let proto = if i % 4 < 2 { "roomcast.json.v1" } else { "roomcast.rkyv.v2" };
            let mut ws = connect(&url, Some(proto)).await;
            let seq = expect_joined(&mut ws, rooms[i % 2]).await;
            (i, ws, seq)
        }
    }))
    .await;
    const N: u64 = 30;
    let mut expected = [Vec::new(), Vec::new()];
    for n in 0..N {
        for (r, room) in rooms.iter().enumerate() {
            let kind = if n % 10 == 0 { "gift" } else { "chat" };
            let seq = publisher.publish(room, kind, json!({ "n": n })).await;
            expected[r].push(seq);
        }
    }
    let results = join_all(clients.into_iter().map(|(i, mut ws, joined_seq)| async move {
        let got = collect(&mut ws, N as usize).await;
        (i, joined_seq, got, ws)
    }))
    .await;
    for (i, joined_seq, got, _ws) in &results {
        let (i, joined_seq) = (*i, *joined_seq);
        let r = i % 2;
        assert!(got.iter().all(|(room, _, _)| room == rooms[r]), "client {i} got another room's message");
        let seqs: Vec<u64> = got.iter().map(|g| g.1).collect();
        assert_eq!(seqs, expected[r], "client {i}: every message once, in seq order");
        assert!(seqs[0] > joined_seq);
        assert_eq!(got.iter().filter(|g| g.2 == "gift").count(), 3);
    }
    // Seqs are per room and dense.
    assert_eq!(expected[0], (1..=N).collect::<Vec<_>>());
    assert_eq!(metric(&publisher, "roomcast_connections").await, 1000.0);
    assert!(metric(&publisher, "roomcast_messages_delivered_total").await >= 1000.0 * N as f64);
}

/// Messages within one window are merged into one frame. Made independent of how fast the
/// publishes come: the window is the longest allowed (4 s) and a batch is full at 5 messages,
/// so the 5th publish flushes the batch at once, with all five in it, and nothing else could
/// have flushed it before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_within_a_window_share_one_frame() {
    let cfg = config(
        "merge-one-frame",
        "[fanout]\nmerge_window_ms = 4000\nmax_batch_messages = 5\n\
         [adaptive]\nenabled = false\nmax_window_ms = 4000\ngift_latency_target_ms = 9000\n",
    );
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let publisher = Publisher::new(edge.http);
    let mut ws = connect(&edge.url("?room=m"), None).await;
    expect_joined(&mut ws, "m").await;
    for n in 0..5 {
        publisher.publish("m", "chat", json!(n)).await;
    }
    match next_msg_within(&mut ws, Duration::from_secs(10)).await {
        Some(ServerMsg::Batch { messages, .. }) => {
            assert_eq!(messages.len(), 5, "five publishes inside one window make one frame");
            let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
            assert!(messages.iter().all(|m| m.ts_us > 1_600_000_000_000_000));
        }
        other => panic!("expected one batch, got {other:?}"),
    }
    assert_eq!(metric(&publisher, "roomcast_batches_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_zero_sends_each_message_without_waiting() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "0"]);
    let publisher = Publisher::new(edge.http);
    let mut ws = connect(&edge.url("?room=z"), Some("roomcast.rkyv.v2")).await;
    expect_joined(&mut ws, "z").await;
    for n in 0..20u64 {
        let seq = publisher.publish("z", "chat", json!(n)).await;
        // The publish answer came back before we read: the frame must already be on its way.
        match next_msg_within(&mut ws, Duration::from_secs(5)).await {
            Some(ServerMsg::Batch { messages, .. }) => {
                assert_eq!(messages.len(), 1);
                assert_eq!(messages[0].seq, seq);
                assert_eq!(messages[0].body, n.to_string());
            }
            other => panic!("expected a batch, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_switch_leave_over_the_socket() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "0"]);
    let publisher = Publisher::new(edge.http);
    // Connect without a room, then join.
    let mut ws = connect(&edge.url(""), Some("roomcast.json.v1")).await;
    send_json(&mut ws, json!({"op": "join", "room": "one"})).await;
    expect_joined(&mut ws, "one").await;
    let s1 = publisher.publish("one", "chat", json!("to one")).await;
    match next_msg_within(&mut ws, Duration::from_secs(5)).await {
        Some(ServerMsg::Batch { room, messages, .. }) => assert_eq!((room.as_str(), messages[0].seq), ("one", s1)),
        other => panic!("{other:?}"),
    }
    // Switch: leave "one", join "two".
    send_json(&mut ws, json!({"op": "switch", "room": "two"})).await;
    assert_eq!(next_msg_within(&mut ws, Duration::from_secs(5)).await, Some(ServerMsg::Left { room: "one".into() }));
    expect_joined(&mut ws, "two").await;
    publisher.publish("one", "chat", json!("not for us")).await;
    let s2 = publisher.publish("two", "chat", json!("to two")).await;
    match next_msg_within(&mut ws, Duration::from_secs(5)).await {
        Some(ServerMsg::Batch { room, messages, .. }) => {
            assert_eq!(room, "two");
            assert_eq!(messages.len(), 1);
            assert_eq!(messages[0].seq, s2);
        }
        other => panic!("{other:?}"),
    }
    // Leave: nothing more arrives. "gone" is numbered (and, window 0, flushed) before the
    // re-join below reaches the room's engine, and the engine's output reaches this shard in
    // order: had it been delivered to us, it would come before `joined`, which
    // `expect_joined` refuses.
    send_json(&mut ws, json!({"op": "leave"})).await;
    assert_eq!(next_msg_within(&mut ws, Duration::from_secs(5)).await, Some(ServerMsg::Left { room: "two".into() }));
    let gone = publisher.publish("two", "chat", json!("gone")).await;
    // Publish over the socket after re-joining (a client kind: gifts come from the publish API
    // unless a token allows them).
    send_json(&mut ws, json!({"op": "join", "room": "two"})).await;
    assert_eq!(expect_joined(&mut ws, "two").await, gone, "joined after the message it did not get");
    send_json(&mut ws, json!({"op": "publish", "kind": "like", "user": "u9", "body": {"rose": 1}})).await;
    let mut saw_ack = false;
    let mut saw_batch = false;
    while !(saw_ack && saw_batch) {
        match next_msg_within(&mut ws, Duration::from_secs(5)).await {
            Some(ServerMsg::Published { room, .. }) => {
                assert_eq!(room, "two");
                saw_ack = true;
            }
            Some(ServerMsg::Batch { messages, .. }) => {
                assert_eq!(messages[0].kind, "like");
                assert_eq!(messages[0].body, r#"{"rose":1}"#);
                assert!(messages[0].user.starts_with("anon-"), "the server's user, not the client's");
                saw_batch = true;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_1001() {
    let mut edge = EdgeProc::start(&["--shards", "2", "--drain-period-ms", "300"]);
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut ws = connect(&edge.url("?room=t"), None).await;
        expect_joined(&mut ws, "t").await;
        clients.push(ws);
    }
    edge.sigterm();
    for ws in &mut clients {
        assert_eq!(close_code(ws, Duration::from_secs(10)).await, Some(1001));
    }
    assert_eq!(edge.wait_exit(Duration::from_secs(10)), Some(0));
}

/// Browsers cannot send WebSocket pings: `{"op":"ping"}` is answered with `pong`, in a room
/// or not, and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_level_ping_gets_a_pong() {
    let edge = EdgeProc::start(&["--shards", "1"]);
    let mut ws = connect(&edge.url(""), None).await;
    send_json(&mut ws, serde_json::json!({ "op": "ping" })).await;
    assert_eq!(next_msg_within(&mut ws, Duration::from_secs(5)).await, Some(ServerMsg::Pong));
    send_json(&mut ws, serde_json::json!({ "op": "join", "room": "p" })).await;
    expect_joined(&mut ws, "p").await;
    send_json(&mut ws, serde_json::json!({ "op": "ping" })).await;
    assert_eq!(next_msg_within(&mut ws, Duration::from_secs(5)).await, Some(ServerMsg::Pong));
}
