//! Idempotent publishes: a publisher that retries with the same `Idempotency-Key` gets the
//! first answer and members get the message once: on one edge, across its restart (the key is
//! stored with the gift), and across edges sharing Redis (a retry that reaches another edge).

use std::time::Duration;

use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;

/// Every message a member receives within `d`, as (seq, kind).
async fn received(ws: &mut Ws, d: Duration) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while let Some(m) = next_msg_within(ws, d).await {
        if let ServerMsg::Batch { messages, .. } = m {
            got.extend(messages.into_iter().map(|m| (m.seq, m.kind)));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_gift_is_published_once_even_across_a_restart() {
    let dir = data_dir("idem");
    let (mut edge, _log) = EdgeProc::start_on(&dir, &["--shards", "1", "--merge-window-ms", "10"], "warn");
    let p = Publisher::new(edge.http);
    let mut ws = connect(&edge.url("?room=shop"), None).await;
    expect_joined(&mut ws, "shop").await;

    let key = [("Idempotency-Key", "order-1001")];
    let (s, h, first) = p.publish_with("shop", "gift", json!({ "n": 1 }), &key).await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(first["replayed"], false);
    assert!(h.get("idempotent-replayed").is_none());
    // The retry: the same answer, marked, and nothing new for members.
    let (s, h, again) = p.publish_with("shop", "gift", json!({ "n": 1 }), &key).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!((again["seq"].clone(), again["ts_us"].clone()), (first["seq"].clone(), first["ts_us"].clone()));
    assert_eq!(again["replayed"], true);
    assert_eq!(h.get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    // Another key is another gift; no key at all is always a new one.
    let (_, _, other) = p.publish_with("shop", "gift", json!({ "n": 2 }), &[("Idempotency-Key", "order-1002")]).await;
    assert_eq!(other["seq"].as_u64(), Some(first["seq"].as_u64().unwrap() + 1));
    assert_eq!(received(&mut ws, Duration::from_millis(500)).await.len(), 2, "two gifts, not three");
    assert!(metric(&p, "roomcast_publish_replayed_total").await >= 1.0);

    // Bad keys are refused with the reason, and counted.
    for bad in ["has space", &"k".repeat(65)] {
        let (s, _, v) = p.publish_with("shop", "gift", json!(1), &[("Idempotency-Key", bad)]).await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("Idempotency-Key"), "{v}");
    }
    let (_, text) = p.get("/metrics").await;
    assert!(text.lines().any(|l| l.contains("reason=\"bad_idempotency_key\"")), "refusals are counted");

    // A crash and a restart: the gift's key was stored with it.
    edge.kill9();
    let (edge, _log) = EdgeProc::start_on(&dir, &["--shards", "1", "--merge-window-ms", "10"], "warn");
    let p = Publisher::new(edge.http);
    let (s, _, after) = p.publish_with("shop", "gift", json!({ "n": 1 }), &key).await;
    assert_eq!(s, 200, "{after}");
    assert_eq!(after["seq"], first["seq"], "the retry after a restart is still the first gift");
    assert_eq!(after["replayed"], true);
    let (_, _, next) = p.publish_with("shop", "gift", json!({ "n": 3 }), &[("Idempotency-Key", "order-1003")]).await;
    assert_eq!(next["replayed"], false);
    assert!(next["seq"].as_u64().unwrap() > other["seq"].as_u64().unwrap());
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_reaches_another_edge_is_not_a_second_gift() {
    let redis = RedisProc::start();
    let url = redis.url();
    let args = ["--shards", "1", "--merge-window-ms", "10", "--bus", url.as_str()];
    let (a, b) = (EdgeProc::start(&args), EdgeProc::start(&args));
    let mut ws = connect(&b.url("?room=shop"), None).await;
    expect_joined(&mut ws, "shop").await;
    let (pa, pb) = (Publisher::new(a.http), Publisher::new(b.http));
    let key = [("Idempotency-Key", "order-7")];
    let (s, _, first) = pa.publish_with("shop", "gift", json!({ "n": 7 }), &key).await;
    assert_eq!(s, 200, "{first}");
    let (s, h, again) = pb.publish_with("shop", "gift", json!({ "n": 7 }), &key).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["seq"], first["seq"]);
    assert_eq!(again["ts_us"], first["ts_us"]);
    assert_eq!(again["replayed"], true);
    assert!(h.get("idempotent-replayed").is_some());
    let got = received(&mut ws, Duration::from_millis(700)).await;
    assert_eq!(got, vec![(first["seq"].as_u64().unwrap(), "gift".to_owned())], "one gift on the other edge");
}

/// Keys belong to their publisher: with publish API keys, the same Idempotency-Key from two
/// publishers is two messages, and each publisher's retry is answered from its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_belong_to_their_publisher() {
    let cfg = config(
        "idem-keys",
        "[[ingest.keys]]\nname = \"shop\"\nkey = \"shop-key-0123456789\"\n\n[[ingest.keys]]\nname = \"game\"\nkey = \"game-key-0123456789\"\n",
    );
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    let shop = [("Authorization", "Bearer shop-key-0123456789"), ("Idempotency-Key", "order-1")];
    let game = [("Authorization", "Bearer game-key-0123456789"), ("Idempotency-Key", "order-1")];
    let (s, _, a) = p.publish_with("r", "gift", json!(1), &shop).await;
    assert_eq!(s, 200, "{a}");
    let (s, _, b) = p.publish_with("r", "gift", json!(2), &game).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["replayed"], false, "another publisher's key is another message");
    assert_ne!(a["seq"], b["seq"]);
    let (_, _, again) = p.publish_with("r", "gift", json!(1), &shop).await;
    assert_eq!((again["seq"].clone(), again["replayed"].clone()), (a["seq"].clone(), json!(true)));
}
