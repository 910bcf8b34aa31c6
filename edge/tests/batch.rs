//! `POST /v1/messages`: several messages to any rooms in one request, each checked and answered
//! on its own, in order; what concerns the whole request (key, shape, bounds) refuses all of it.

use std::time::Duration;

use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::{Value, json};

/// Every message a member receives within `d`, as (seq, kind, body).
async fn received(ws: &mut Ws, d: Duration) -> Vec<(u64, String, Value)> {
    let mut got = Vec::new();
    while let Some(m) = next_msg_within(ws, d).await {
        if let ServerMsg::Batch { messages, .. } = m {
            got.extend(
                messages.into_iter().map(|m| (m.seq, m.kind, serde_json::from_str(&m.body).unwrap_or(Value::Null))),
            );
        }
    }
    got
}

async fn batch(p: &Publisher, messages: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    p.post_with("/v1/messages", json!({ "messages": messages }).to_string().into_bytes(), headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_publishes_each_message_in_order_and_answers_each() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "10"]);
    let p = Publisher::new(edge.http);
    let mut a = connect(&edge.url("?room=a"), None).await;
    expect_joined(&mut a, "a").await;
    let mut b = connect(&edge.url("?room=b"), None).await;
    expect_joined(&mut b, "b").await;

    let msgs = json!([
        { "room": "a", "kind": "gift", "body": { "n": 1 }, "idempotency_key": "order-1" },
        { "room": "b", "kind": "chat", "user": "u1", "body": { "text": "hi" } },
        { "room": "a", "kind": "gift", "body": { "n": 2 }, "idempotency_key": "order-2" },
        { "room": "a", "kind": "Bad Kind", "body": 1 },
        { "room": "", "kind": "gift", "body": 1 },
        { "room": "a", "kind": "gift", "body": 1, "colour": "red" },
        { "room": "a", "kind": "gift", "body": 1, "idempotency_key": "has space" },
        "not a message",
        { "room": "a", "kind": "gift", "body": { "n": 3 }, "idempotency_key": "order-3" },
    ]);
    let (s, v) = batch(&p, &msgs, &[]).await;
    assert_eq!(s, 200, "{v}");
    let r = v["results"].as_array().expect("results");
    let statuses: Vec<u64> = r.iter().map(|x| x["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [200, 200, 200, 400, 400, 400, 400, 400, 200], "{v}");
    assert!(r[3]["error"].as_str().unwrap().contains("bad kind"), "{v}");
    assert!(r[4]["error"].as_str().unwrap().contains("bad room"), "{v}");
    assert!(r[5]["error"].as_str().unwrap().contains("colour"), "{v}");
    assert!(r[6]["error"].as_str().unwrap().contains("idempotency_key"), "{v}");
    let seqs: Vec<u64> = [0, 2, 8].iter().map(|&i| r[i]["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "room a numbers in the batch's order: {seqs:?}");
    assert_eq!(r[1]["room"], "b");

    // Members get what was accepted, in order, and nothing refused.
    let got_a = received(&mut a, Duration::from_millis(500)).await;
    let ns: Vec<(u64, Value)> = got_a.iter().map(|(seq, _, body)| (*seq, body["n"].clone())).collect();
    assert_eq!(ns, [(seqs[0], json!(1)), (seqs[1], json!(2)), (seqs[2], json!(3))]);
    let got_b = received(&mut b, Duration::from_millis(200)).await;
    assert_eq!(got_b.len(), 1);
    assert_eq!(got_b[0].1, "chat");

    // A retried batch: the keyed gifts are answered from the first time, nothing new for members.
    let retry = json!([
        { "room": "a", "kind": "gift", "body": { "n": 1 }, "idempotency_key": "order-1" },
        { "room": "a", "kind": "gift", "body": { "n": 4 }, "idempotency_key": "order-4" },
    ]);
    let (s, v) = batch(&p, &retry, &[]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["replayed"], true, "{v}");
    assert_eq!(v["results"][0]["seq"].as_u64(), Some(seqs[0]));
    assert_eq!(v["results"][1]["replayed"], false, "{v}");
    let again = received(&mut a, Duration::from_millis(500)).await;
    assert_eq!(again.len(), 1, "only the new gift: {again:?}");
    assert_eq!(again[0].2["n"], 4);

    // Every refusal is counted by its reason.
    let (_, text) = p.get("/metrics").await;
    for reason in ["bad_kind", "bad_room", "bad_json", "bad_idempotency_key"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("roomcast_publish_rejected_total") && l.contains(&format!("\"{reason}\""))),
            "{reason} not counted"
        );
    }
    assert!(text.contains("roomcast_publish_duration_seconds_count{outcome=\"batch\"}"), "batches are timed");
}

/// What concerns the whole request refuses all of it; what concerns one message, that message:
/// keys (none: 401; outside the key's rooms or kinds: that message 403), the body's shape, the
/// number of messages (`ingest.max_batch`) and one message's size (`ingest.max_body_bytes`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_held_to_keys_and_bounds() {
    const KEY: &str = "shop-key-0123456789";
    let cfg = config(
        "batch-keys",
        &format!(
            "[ingest]\nmax_batch = 3\nmax_body_bytes = 1024\n\n\
             [[ingest.keys]]\nname = \"shop\"\nkey = \"{KEY}\"\nrooms = [\"shop-*\"]\nkinds = [\"gift\", \"chat\"]\n"
        ),
    );
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "10", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    let auth = [("Authorization", &*format!("Bearer {KEY}"))];
    let one = json!([{ "room": "shop-1", "kind": "gift", "body": 1 }]);

    let (s, v) = batch(&p, &one, &[]).await;
    assert_eq!(s, 401, "no key: {v}");
    let (s, v) = batch(&p, &one, &[("Authorization", "Bearer wrong-key-0123456789")]).await;
    assert_eq!(s, 401, "unknown key: {v}");

    let msgs = json!([
        { "room": "shop-1", "kind": "gift", "body": 1 },
        { "room": "other", "kind": "gift", "body": 2 },
        { "room": "shop-1", "kind": "like", "body": 3 },
    ]);
    let (s, v) = batch(&p, &msgs, &auth).await;
    assert_eq!(s, 200, "{v}");
    let r = &v["results"];
    assert_eq!(r[0]["status"], 200, "{v}");
    assert_eq!((r[1]["status"].clone(), r[1]["reason"].clone()), (json!(403), json!("key_room")), "{v}");
    assert_eq!((r[2]["status"].clone(), r[2]["reason"].clone()), (json!(403), json!("key_kind")), "{v}");

    let four = json!([one[0], one[0], one[0], one[0]]);
    let (s, v) = batch(&p, &four, &auth).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("ingest.max_batch"), "{v}");

    let big = json!([{ "room": "shop-1", "kind": "chat", "body": "x".repeat(2000) }, one[0]]);
    let (s, v) = batch(&p, &big, &auth).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["status"], 413, "a message over max_body_bytes: {v}");
    assert_eq!(v["results"][1]["status"], 200, "{v}");

    for bad in [json!([1, 2]), json!({ "messages": 1 }), json!({ "messages": [], "extra": 1 })] {
        let (s, v) = p.post_with("/v1/messages", bad.to_string().into_bytes(), &auth).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap().contains("messages"), "{v}");
    }
    let (s, v) = p.post_with("/v1/messages", vec![b'['; 2 << 20], &auth).await;
    assert_eq!(s, 413, "over ingest.max_batch_bytes: {v}");
    assert!(v["error"].as_str().unwrap().contains("ingest.max_batch_bytes"), "{v}");
    // A message's fields as a positional array are not a message (nor is the batch one).
    let (s, v) = batch(&p, &json!([["shop-1", "gift", "", 1]]), &auth).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["status"], 400, "{v}");
    assert!(v["results"][0]["error"].as_str().unwrap().contains("JSON object"), "{v}");
    let (s, v) = p.post_with("/v1/messages", json!([["shop-1", "gift", "", 1]]).to_string().into_bytes(), &auth).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = p.post_with("/v1/rooms/shop-1/messages", json!(["gift", "", 1]).to_string().into_bytes(), &auth).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("JSON object"), "{v}");
    // One message over ingest.max_body_bytes on its own endpoint: JSON naming the setting.
    let body = json!({ "kind": "chat", "body": "x".repeat(2000) }).to_string().into_bytes();
    let (s, v) = p.post_with("/v1/rooms/shop-1/messages", body, &auth).await;
    assert_eq!(s, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("ingest.max_body_bytes"), "{v}");
}

/// A batch larger than an engine's mailbox (8,192 commands) on an idle edge: every message is
/// published, in order, not the first 8,192 and 503 for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_engine_mailbox_is_published_whole() {
    let cfg = config(
        "batch-big",
        "[ingest]\nmax_batch = 20000\nmax_batch_bytes = 4194304\n[limits]\nmust_deliver_room_burst = 20000\n",
    );
    let edge = EdgeProc::start(&["--shards", "1", "--no-store", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    let msgs: Vec<Value> = (0..12_000).map(|n| json!({ "room": "big", "kind": "gift", "body": n })).collect();
    let (s, v) = batch(&p, &Value::Array(msgs), &[]).await;
    assert_eq!(s, 200);
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 12_000);
    let refused: Vec<&Value> = r.iter().filter(|x| x["status"] != 200).take(3).collect();
    assert!(refused.is_empty(), "{refused:?}");
    let seqs: Vec<u64> = r.iter().map(|x| x["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]), "numbered in the batch's order");
}

#[test]
fn batch_bounds_in_the_config_are_checked() {
    for (text, key) in [
        ("[ingest]\nmax_batch = 0\n", "ingest.max_batch"),
        ("[ingest]\nmax_batch_bytes = 100\n", "ingest.max_batch_bytes"),
    ] {
        let cfg = config("batch-cfg", text);
        let out = std::process::Command::new(edge_bin()).args(["--check-config", "--config", &cfg]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(key), "{text}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// With a shared bus (Redis numbers the messages), a batch's messages to one room are numbered
/// in the batch's order too, whatever their kinds: a trial got `[2,3,4,1]` for four gifts to a
/// new room and a chat numbered before the gift ahead of it, in every room it tried (each
/// publish raced to Redis on a task of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_batch_is_numbered_in_its_order() {
    let redis = RedisProc::start();
    let url = redis.url();
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "10", "--bus", &url]);
    let p = Publisher::new(edge.http);
    let kinds: [&[&str]; 3] = [&["gift"; 4], &["chat"; 4], &["gift", "chat", "gift", "chat", "chat", "gift"]];
    for round in 0..4 {
        for (i, ks) in kinds.iter().enumerate() {
            let room = format!("order-{round}-{i}");
            let msgs: Vec<Value> = ks
                .iter()
                .enumerate()
                .map(|(n, k)| json!({ "room": room, "kind": k, "user": format!("u{n}"), "body": { "n": n } }))
                .collect();
            let (s, v) = batch(&p, &Value::Array(msgs), &[]).await;
            assert_eq!(s, 200, "{v}");
            let seqs: Vec<u64> =
                v["results"].as_array().unwrap().iter().map(|r| r["seq"].as_u64().expect("accepted")).collect();
            assert_eq!(seqs, (1..=ks.len() as u64).collect::<Vec<_>>(), "{room} ({ks:?}): {v}");
        }
    }
}
