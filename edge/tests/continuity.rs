//! Continuity through the real edge: a room's numbering has an epoch; a client whose position
//! belongs to another numbering, or is ahead of the room, is told (`reset`) before anything
//! else, in local mode and when Redis loses the room under the edges.

mod util;

use std::time::Duration;

use roomcast_proto::envelope::ServerMsg;
use serde_json::json;
use util::*;

/// The next messages up to and including the first `joined`.
async fn until_joined(ws: &mut Ws) -> Vec<ServerMsg> {
    let mut got = Vec::new();
    loop {
        let m = next_msg_within(ws, Duration::from_secs(10)).await.expect("joined");
        let done = matches!(m, ServerMsg::Joined { .. });
        got.push(m);
        if done {
            return got;
        }
    }
}

/// Seqs of the next batches, until `n` messages arrived.
async fn batch_seqs(ws: &mut Ws, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < n {
        match next_msg_within(ws, Duration::from_secs(10)).await {
            Some(ServerMsg::Batch { messages, .. }) => seqs.extend(messages.iter().map(|m| m.seq)),
            Some(_) => {}
            None => panic!("no batch; got {seqs:?}"),
        }
    }
    seqs
}

fn epoch_of(m: &ServerMsg) -> String {
    match m {
        ServerMsg::Joined { epoch, .. } | ServerMsg::Reset { epoch, .. } => epoch.clone(),
        other => panic!("{other:?}"),
    }
}

/// Local mode: `joined` names the epoch; `since` with the right epoch recovers as before; a
/// stale epoch, or a `since` ahead of the room, gets `reset` first (then `joined`, then the
/// room's must-deliver history from its start), never a silent join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_positions_are_reset_explicitly() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "0"]);
    let p = Publisher::new(edge.http);
    for n in 1..=3 {
        p.publish("show", "gift", json!({ "n": n })).await;
    }
    let mut ws = connect(&edge.url("?room=show"), None).await;
    let first = until_joined(&mut ws).await;
    assert_eq!(first.len(), 1, "no reset without since: {first:?}");
    let epoch = epoch_of(&first[0]);
    assert_eq!(epoch.len(), 16);

    // The same numbering: gifts after 1, no reset.
    let mut ws = connect(&edge.url(&format!("?room=show&since=1&epoch={epoch}")), None).await;
    let got = until_joined(&mut ws).await;
    assert!(matches!(got[..], [ServerMsg::Joined { seq: 3, .. }]), "{got:?}");
    assert_eq!(batch_seqs(&mut ws, 2).await, vec![2, 3]);

    // A stale epoch: reset before joined, then the numbering from its start.
    let mut ws = connect(&edge.url("?room=show&since=2&epoch=00000000000000aa"), None).await;
    let got = until_joined(&mut ws).await;
    match &got[..] {
        [ServerMsg::Reset { epoch: e, seq: 0, reason, .. }, ServerMsg::Joined { epoch: j, .. }] => {
            assert_eq!((e, j), (&epoch, &epoch));
            assert!(reason.contains("epoch"), "{reason}");
        }
        other => panic!("expected reset then joined: {other:?}"),
    }
    assert_eq!(batch_seqs(&mut ws, 3).await, vec![1, 2, 3]);

    // Ahead of the room, over the socket's join: reset too.
    let mut ws = connect(&edge.url(""), None).await;
    send_json(&mut ws, json!({"op":"join","room":"show","since":50})).await;
    let got = until_joined(&mut ws).await;
    assert!(matches!(&got[0], ServerMsg::Reset { reason, .. } if reason.contains("ahead")), "{got:?}");
    let resets = metric(&p, "roomcast_join_resets_total").await;
    assert_eq!(resets, 2.0);
}

/// Redis emptied under two edges: the next publish starts a new numbering; members get
/// `reset` with its epoch, then its messages from seq 1; a client holding the old epoch is
/// reset at its join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_emptied_under_the_edges_resets_members() {
    let redis = RedisProc::start();
    let url = redis.url();
    let a = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0", "--bus", &url]);
    let b = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0", "--bus", &url]);
    let pb = Publisher::new(b.http);
    let mut member = connect(&a.url("?room=live"), None).await;
    let old_epoch = epoch_of(until_joined(&mut member).await.last().unwrap());
    for n in 1..=3 {
        pb.publish("live", "gift", json!({ "n": n })).await;
    }
    assert_eq!(batch_seqs(&mut member, 3).await, vec![1, 2, 3]);

    // FLUSHALL, as an operator emptying Redis would.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
        s.write_all(b"FLUSHALL\r\n").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"+OK\r\n");
    }
    assert_eq!(pb.publish("live", "gift", json!({ "n": 4 })).await, 1, "Redis numbers anew");
    let new_epoch = loop {
        match next_msg_within(&mut member, Duration::from_secs(10)).await {
            Some(m @ ServerMsg::Reset { .. }) => break epoch_of(&m),
            Some(ServerMsg::Batch { messages, .. }) => panic!("a batch before the reset: {messages:?}"),
            Some(_) => {}
            None => panic!("no reset"),
        }
    };
    assert_ne!(new_epoch, old_epoch);
    assert_eq!(batch_seqs(&mut member, 1).await, vec![1]);

    // A client of the old numbering joins through the other edge: reset first.
    let mut late = connect(&b.url(&format!("?room=live&since=3&epoch={old_epoch}")), None).await;
    let got = until_joined(&mut late).await;
    assert!(matches!(&got[0], ServerMsg::Reset { epoch, .. } if epoch == &new_epoch), "{got:?}");
    assert_eq!(batch_seqs(&mut late, 1).await, vec![1]);
}
