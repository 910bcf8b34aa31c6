//! Latest-state kinds (conflation): a joiner gets the newest message of each key before live
//! messages, on one edge and across edges through Redis; within a window only the newest of a
//! key goes out.

use std::time::Duration;

use roomcast_proto::envelope::{PushMessage, ServerMsg};
use roomcast_testsupport::*;
use serde_json::json;

const KINDS: &str = "[kinds.board]\nmust_deliver = false\nconflate = true\nconflate_key = \"slot\"\n\
                     [kinds.gift]\nmust_deliver = true\n[kinds.chat]\nmust_deliver = false\n";

/// Messages after `joined`, until `n` arrived (other traffic skipped).
async fn messages(ws: &mut Ws, n: usize) -> Vec<PushMessage> {
    let mut got = Vec::new();
    while got.len() < n {
        match next_msg_within(ws, Duration::from_secs(10)).await {
            Some(ServerMsg::Batch { messages, .. }) => got.extend(messages),
            Some(ServerMsg::Joined { .. }) => {}
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    got
}

fn bodies(ms: &[PushMessage]) -> Vec<String> {
    ms.iter().map(|m| format!("{}:{}", m.kind, m.body)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_gets_the_newest_of_each_key_and_a_window_carries_one_per_key() {
    let cfg = config("latest-one", &format!("[presence]\ninterval_ms = 0\n{KINDS}"));
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "300", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    for n in 1..=3 {
        p.publish("show", "board", json!({ "slot": "top", "n": n })).await;
    }
    p.publish("show", "board", json!({ "slot": "pin", "text": "welcome" })).await;
    p.publish("show", "chat", json!("hi")).await;
    let mut ws = connect(&edge.url("?room=show"), None).await;
    let got = messages(&mut ws, 2).await;
    assert_eq!(
        bodies(&got),
        vec![r#"board:{"slot":"top","n":3}"#, r#"board:{"slot":"pin","text":"welcome"}"#],
        "the newest of each key, in seq order, and no chat"
    );
    // Live: five updates of one key within one window arrive as the newest alone.
    for n in 4..=8 {
        p.publish("show", "board", json!({ "slot": "top", "n": n })).await;
    }
    p.publish("show", "gift", json!({ "rose": 1 })).await;
    let got = messages(&mut ws, 2).await;
    assert_eq!(bodies(&got), vec![r#"board:{"slot":"top","n":8}"#, r#"gift:{"rose":1}"#]);
    // A config that conflates a must-deliver kind is refused, naming the key.
    let bad = config("latest-bad", "[kinds.gift]\nmust_deliver = true\nconflate = true\n");
    let out = std::process::Command::new(edge_bin()).args(["--config", &bad, "--check-config"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("kinds.gift.conflate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_state_published_on_one_edge_reaches_joiners_on_another() {
    let redis = RedisProc::start();
    let cfg = config("latest-cluster", &format!("[presence]\ninterval_ms = 0\n{KINDS}"));
    let url = redis.url();
    let start = || EdgeProc::start(&["--shards", "1", "--bus", url.as_str(), "--config", &cfg]);
    let (e1, e2) = (start(), start());
    let p1 = Publisher::new(e1.http);
    // Published where nobody is a member, before any edge follows the room.
    p1.publish("tour", "board", json!({ "slot": "status", "live": false })).await;
    p1.publish("tour", "board", json!({ "slot": "status", "live": true })).await;
    p1.publish("tour", "board", json!({ "slot": "pin", "text": "rules" })).await;
    let mut ws = connect(&e2.url("?room=tour"), None).await;
    let got = messages(&mut ws, 2).await;
    assert_eq!(bodies(&got), vec![r#"board:{"slot":"status","live":true}"#, r#"board:{"slot":"pin","text":"rules"}"#]);
    // An update published on the first edge reaches the member on the second, and a later
    // joiner there gets it as the newest.
    p1.publish("tour", "board", json!({ "slot": "pin", "text": "new rules" })).await;
    let got = messages(&mut ws, 1).await;
    assert_eq!(bodies(&got), vec![r#"board:{"slot":"pin","text":"new rules"}"#]);
    let mut late = connect(&e2.url("?room=tour"), None).await;
    let got = messages(&mut late, 2).await;
    assert_eq!(
        bodies(&got),
        vec![r#"board:{"slot":"status","live":true}"#, r#"board:{"slot":"pin","text":"new rules"}"#]
    );
}
