//! Continuity through the real edge: a room's numbering has an epoch; a client whose position
//! belongs to another numbering, or is ahead of the room, is told (`reset`) before anything
//! else, in local mode and when Redis loses the room under the edges.

use std::time::Duration;

use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;

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

/// What an upgrade is answered: the status and the reason in the body (101 and empty when it
/// was accepted).
async fn upgrade_answer(url: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => (101, String::new()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("{url}: {e}"),
    }
}

/// A malformed position is refused, never taken for another numbering (found by a new user's
/// trial: `epoch=00ab` got `reset` "epoch changed"): at the upgrade a 400 naming the field, as
/// SSE refuses a malformed `Last-Event-ID`; in a `join` an `error` `bad_message`, the connection
/// staying in its room. Both are counted; a well-formed epoch of another numbering still resets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_position_is_refused_not_reset() {
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0"]);
    let p = Publisher::new(edge.http);
    p.publish("show", "gift", json!({ "n": 1 })).await;
    let mut member = connect(&edge.url("?room=show"), None).await;
    let epoch = epoch_of(until_joined(&mut member).await.last().unwrap());
    // The epoch in decimal (as Redis keeps it; a local epoch is random, so 19 or 20 digits:
    // malformed), upper case, cut short, with a digit more.
    let decimal = u64::from_str_radix(&epoch, 16).unwrap().to_string();
    let decimal = if decimal.len() == 16 { format!("{decimal}0") } else { decimal };
    let cases = [
        (format!("?room=show&since=1&epoch={decimal}"), "bad epoch"),
        (format!("?room=show&since=1&epoch={}", epoch.to_uppercase()), "bad epoch"),
        (format!("?room=show&since=1&epoch={}", &epoch[4..]), "bad epoch"),
        (format!("?room=show&since=1&epoch={epoch}0"), "bad epoch"),
        ("?room=show&since=1&epoch=".to_owned(), "bad epoch"),
        ("?room=show&epoch=xyz".to_owned(), "bad epoch"),
        (format!("?room=show&since=%2B1&epoch={epoch}"), "bad since"),
        (format!("?room=show&since=1.0&epoch={epoch}"), "bad since"),
        (format!("?room=show&since=1&since=2&epoch={epoch}"), "bad since"),
        (format!("?room=show&since=1&epoch={epoch}&epoch=00000000000000aa"), "bad epoch"),
    ];
    let before = metric(&p, "roomcast_handshake_failures_total").await;
    for (query, reason) in &cases {
        let (status, body) = upgrade_answer(&edge.url(query)).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(reason), "{query}: {body}");
    }
    let refused = metric(&p, "roomcast_handshake_failures_total").await - before;
    assert_eq!(refused, cases.len() as f64, "every refusal counted");
    assert_eq!(metric(&p, "roomcast_join_resets_total").await, 0.0, "no reset for a malformed epoch");

    // The same over the socket: a join with a malformed epoch is a bad message; the member
    // stays where it was and keeps receiving.
    let signals_before = metric(&p, "roomcast_signals_refused_total").await;
    for bad in [decimal.as_str(), "00ab", ""] {
        send_json(&mut member, json!({"op": "join", "room": "other", "since": 1, "epoch": bad})).await;
        match next_msg_within(&mut member, Duration::from_secs(5)).await {
            Some(ServerMsg::Error { code, message }) => {
                assert_eq!(code, "bad_message", "{bad}: {message}");
                assert!(message.contains("bad epoch"), "{bad}: {message}");
            }
            other => panic!("{bad}: expected an error, got {other:?}"),
        }
    }
    // `since` is a number in JSON: a string or a negative one is refused as malformed.
    for bad in [json!("1"), json!(-1), json!(1.5)] {
        send_json(&mut member, json!({"op": "join", "room": "other", "since": bad, "epoch": epoch})).await;
        match next_msg_within(&mut member, Duration::from_secs(5)).await {
            Some(ServerMsg::Error { code, .. }) => assert_eq!(code, "bad_message", "{bad}"),
            other => panic!("{bad}: expected an error, got {other:?}"),
        }
    }
    let signals = metric(&p, "roomcast_signals_refused_total").await - signals_before;
    assert_eq!(signals, 6.0, "every refused join counted");
    let seq = p.publish("show", "gift", json!({ "n": 2 })).await;
    assert_eq!(batch_seqs(&mut member, 1).await, vec![seq], "still in its room");
    assert_eq!(metric(&p, "roomcast_join_resets_total").await, 0.0);

    // Well-formed but not the room's: still a reset, at the upgrade and in a join.
    let (status, _) = upgrade_answer(&edge.url("?room=show&since=1&epoch=00000000000000aa")).await;
    assert_eq!(status, 101);
    send_json(&mut member, json!({"op": "join", "room": "show", "since": 1, "epoch": "00000000000000aa"})).await;
    let got = until_joined(&mut member).await;
    assert!(matches!(&got[..], [.., ServerMsg::Reset { .. }, ServerMsg::Joined { .. }]), "{got:?}");
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

/// Publishes a gift; returns its seq (panics on anything but 200).
async fn gift(p: &Publisher, room: &str, n: u64) -> u64 {
    p.publish(room, "gift", json!({ "n": n })).await
}

/// Joins with `since`/`epoch`; returns what came before `joined` (resets), `joined`'s seq and
/// epoch, and the seqs replayed (read until `replay` of them arrived).
async fn rejoin(
    edge: &EdgeProc,
    room: &str,
    since: u64,
    epoch: &str,
    replay: usize,
) -> (Vec<ServerMsg>, u64, String, Vec<u64>) {
    let mut ws = connect(&edge.url(&format!("?room={room}&since={since}&epoch={epoch}")), None).await;
    let mut got = until_joined(&mut ws).await;
    let Some(ServerMsg::Joined { seq, epoch, .. }) = got.pop() else { unreachable!() };
    let seqs = if replay > 0 { batch_seqs(&mut ws, replay).await } else { Vec::new() };
    (got, seq, epoch, seqs)
}

/// A clean restart (SIGTERM) keeps every room's epoch, seq and must-deliver history: a member
/// that saw gifts 1-5 and was away for 6-7 recovers them with `since` after the restart, and
/// numbering continues at 8 (a clean stop writes the exact seq: no skip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_restart_keeps_numbering_and_gifts() {
    let dir = data_dir("sigterm");
    let args = ["--shards", "2", "--merge-window-ms", "0"];
    let (mut edge, _) = EdgeProc::start_on(&dir, &args, "warn");
    let p = Publisher::new(edge.http);
    let mut ws = connect(&edge.url("?room=show"), None).await;
    let epoch = epoch_of(until_joined(&mut ws).await.last().unwrap());
    for n in 1..=5 {
        assert_eq!(gift(&p, "show", n).await, n);
    }
    assert_eq!(batch_seqs(&mut ws, 5).await, vec![1, 2, 3, 4, 5]);
    drop(ws);
    for n in 6..=7 {
        gift(&p, "show", n).await;
    }
    edge.sigterm();
    assert_eq!(edge.wait_exit(Duration::from_secs(15)), Some(0));

    let (edge, _) = EdgeProc::start_on(&dir, &args, "warn");
    let p = Publisher::new(edge.http);
    let (before, seq, e, replay) = rejoin(&edge, "show", 5, &epoch, 2).await;
    assert!(before.is_empty(), "no reset: same numbering ({before:?})");
    assert_eq!((seq, e.as_str(), replay), (7, epoch.as_str(), vec![6, 7]));
    assert_eq!(gift(&p, "show", 8).await, 8, "numbering continues without a skip");
    assert_eq!(metric(&p, "roomcast_store_renumbered_total").await, 0.0, "a clean restart is trusted");
    let _ = std::fs::remove_dir_all(dir);
}

/// `kill -9` in the middle of a burst of gifts: after the restart every gift whose publish was
/// acknowledged is recovered with `since`, in the same epoch, and no seq is used twice (the
/// next one is above everything handed out before the crash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_loses_no_acknowledged_gift() {
    let dir = data_dir("kill9");
    let args = ["--shards", "2", "--merge-window-ms", "5"];
    let (mut edge, _) = EdgeProc::start_on(&dir, &args, "warn");
    let http = edge.http;
    let mut ws = connect(&edge.url("?room=burst"), None).await;
    let epoch = epoch_of(until_joined(&mut ws).await.last().unwrap());
    // Four publishers; each remembers the seqs it got a 200 for.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let p = Publisher::new(http);
            for n in 0.. {
                let body = json!({ "kind": "gift", "body": { "t": t, "n": n } }).to_string().into_bytes();
                match tokio::time::timeout(Duration::from_secs(2), p.post_raw("/v1/rooms/burst/messages", body)).await {
                    Ok((200, v)) => acked.lock().unwrap().push(v["seq"].as_u64().unwrap()),
                    _ => return,
                }
            }
        }));
    }
    let enough = wait_until(Duration::from_secs(20), || async { acked.lock().unwrap().len() >= 300 }).await;
    assert!(enough, "the burst did not get going");
    edge.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let acked: std::collections::BTreeSet<u64> = acked.lock().unwrap().iter().copied().collect();
    let max_acked = *acked.last().unwrap();
    // Everything the member saw before the crash, acknowledged or not yet.
    let mut seen_max = 0;
    while let Some(m) = next_msg_within(&mut ws, Duration::from_millis(200)).await {
        if let ServerMsg::Batch { messages, .. } = m {
            seen_max = seen_max.max(messages.iter().map(|m| m.seq).max().unwrap_or(0));
        }
    }

    let (edge, log) = EdgeProc::start_on(&dir, &args, "warn");
    let p = Publisher::new(edge.http);
    let mut ws = connect(&edge.url(&format!("?room=burst&since=0&epoch={epoch}")), None).await;
    let got = until_joined(&mut ws).await;
    assert_eq!(got.len(), 1, "same epoch, no reset: {got:?}");
    let mut recovered = std::collections::BTreeSet::new();
    while let Some(m) = next_msg_within(&mut ws, Duration::from_millis(500)).await {
        if let ServerMsg::Batch { messages, .. } = m {
            recovered.extend(messages.iter().map(|m| m.seq));
        }
    }
    let lost: Vec<u64> = acked.difference(&recovered).copied().collect();
    assert!(lost.is_empty(), "acknowledged gifts lost: {lost:?} (of {})", acked.len());
    let next = gift(&p, "burst", 0).await;
    assert!(next > max_acked && next > seen_max, "seq {next} reused (acked up to {max_acked}, seen {seen_max})");
    assert_eq!(metric(&p, "roomcast_store_renumbered_total").await, 0.0, "a process crash is trusted");
    // A plain crash leaves no torn batch (the journal's preallocated zeros are not one).
    assert!(!log.lock().unwrap().contains("torn write"), "{}", log.lock().unwrap());
    let _ = std::fs::remove_dir_all(dir);
}

/// A room that leaves memory when idle stays on disk: its numbering continues in the same
/// epoch when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_eviction_continues_the_numbering() {
    let cfg = config("idle", "[history]\nmax_age_ms = 300\nroom_idle_ms = 400\n");
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    for n in 1..=3 {
        gift(&p, "quiet", n).await;
    }
    let (_, stats) = p.get("/v1/rooms/quiet").await;
    let epoch = serde_json::from_str::<serde_json::Value>(&stats).unwrap()["epoch"].as_str().unwrap().to_owned();
    let gone = wait_until(Duration::from_secs(10), || async { p.get("/v1/rooms/quiet").await.0 == 404 }).await;
    assert!(gone, "the idle room left memory");
    assert_eq!(gift(&p, "quiet", 4).await, 4, "numbering continues");
    let (_, stats) = p.get("/v1/rooms/quiet").await;
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["epoch"].as_str().unwrap(), epoch);
    assert!(metric(&p, "roomcast_rooms_restored_total").await >= 1.0);
}

/// At `store.max_bytes` must-deliver publishes get 507 and take no seq while droppable kinds
/// flow; once retention has aged the gifts out, the space is reclaimed (retention deletes by
/// marking: the store compacts when it finds itself full) and gifts are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_gifts_explicitly_until_retention_frees_space() {
    let cfg = config("full", "[store]\nmax_bytes = 268435456\n[history]\nmax_age_ms = 15000\n");
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    // Incompressible bodies (the store compresses its tables).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut pad = move || -> String {
        (0..60_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"[(x % 62) as usize])
            })
            .collect()
    };
    let mut refused = None;
    for n in 0..8000u64 {
        let body = json!({ "kind": "gift", "body": { "n": n, "pad": pad() } }).to_string().into_bytes();
        let (st, v) = p.post_raw(&format!("/v1/rooms/f{}/messages", n % 16), body).await;
        match st {
            200 => {}
            507 => {
                assert_eq!(v["dropped"], false);
                refused = Some(n);
                break;
            }
            other => panic!("{other}: {v}"),
        }
    }
    let n = refused.expect("the store filled up");
    assert!(n > 1000, "the bound is the data's, not the journal's preallocation: refused after {n}");
    let seq_before = p.publish("f0", "chat", json!("hi")).await;
    let (_, text) = p.get("/metrics").await;
    assert!(text.contains("roomcast_publish_rejected_total{reason=\"store_full\"} 1"), "{text}");
    // Retention (15 s) ages the gifts out; the store reclaims the space and takes gifts again.
    let back = wait_until(Duration::from_secs(60), || async {
        let body = json!({ "kind": "gift", "body": 1 }).to_string().into_bytes();
        p.post_raw("/v1/rooms/f0/messages", body).await.0 == 200
    })
    .await;
    assert!(back, "gifts are taken again once retention freed space");
    assert!(p.publish("f0", "chat", json!("after")).await > seq_before);
}

/// A torn write at the journal's tail (garbage after the last good batch) is cut off at the
/// next start, with a log line; every gift written before it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_truncated_and_logged() {
    let dir = data_dir("torn");
    let args = ["--shards", "1", "--merge-window-ms", "0"];
    let (mut edge, _) = EdgeProc::start_on(&dir, &args, "warn");
    let p = Publisher::new(edge.http);
    let mut ws = connect(&edge.url("?room=t"), None).await;
    let epoch = epoch_of(until_joined(&mut ws).await.last().unwrap());
    for n in 1..=4 {
        gift(&p, "t", n).await;
    }
    edge.kill9();
    // Append a partial batch to the newest journal file, as a crash mid-write would leave.
    let mut journals = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "jnl") {
                journals.push(path);
            }
        }
    }
    let newest = journals.iter().max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap()).expect("a journal");
    {
        // Journals are preallocated with zeros: the torn batch goes right after the last
        // written byte, where the next batch would have started.
        use std::io::{Seek, SeekFrom, Write};
        let data = std::fs::read(newest).unwrap();
        let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let mut f = std::fs::OpenOptions::new().write(true).open(newest).unwrap();
        f.seek(SeekFrom::Start(end as u64)).unwrap();
        f.write_all(&[0x5a; 37]).unwrap();
    }
    let (edge, log) = EdgeProc::start_on(&dir, &args, "warn");
    let (before, seq, e, replay) = rejoin(&edge, "t", 0, &epoch, 4).await;
    assert!(before.is_empty(), "{before:?}");
    // After a crash the numbering resumes past the reservation: no seq can be reused.
    assert!(seq >= 4, "{seq}");
    assert_eq!((e.as_str(), replay), (epoch.as_str(), vec![1, 2, 3, 4]));
    // The log comes through a reader thread, which may be behind the edge's ready line.
    assert!(
        wait_until(Duration::from_secs(10), || async { log.lock().unwrap().contains("torn write") }).await,
        "{}",
        log.lock().unwrap()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Without the store (`--no-store`), a restart is a new numbering, and clients are told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_store_a_restart_resets_clients() {
    let args = ["--shards", "1", "--merge-window-ms", "0", "--no-store"];
    let mut edge = EdgeProc::start(&args);
    let p = Publisher::new(edge.http);
    let mut ws = connect(&edge.url("?room=m"), None).await;
    let epoch = epoch_of(until_joined(&mut ws).await.last().unwrap());
    gift(&p, "m", 1).await;
    edge.sigterm();
    edge.wait_exit(Duration::from_secs(15));
    let edge = EdgeProc::start(&args);
    let p = Publisher::new(edge.http);
    gift(&p, "m", 1).await;
    let (before, _, e, _) = rejoin(&edge, "m", 1, &epoch, 0).await;
    assert!(matches!(&before[..], [ServerMsg::Reset { .. }]), "{before:?}");
    assert_ne!(e, epoch);
}

/// A run that did not stop cleanly, followed by a reboot (the page cache is gone), under a
/// policy that acknowledges before fsync, may have lost acknowledged gifts: every room comes
/// back under a new epoch (clients are reset, never told a silent story), numbering above
/// every seq handed out. Under "always", or after a mere process crash, nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclean_stop_and_a_reboot_under_a_lossy_policy_renumbers_explicitly() {
    for (policy, reboot, renumbered) in [("10", true, true), ("10", false, false), ("\"always\"", true, false)] {
        let dir = data_dir("reboot");
        // A short drain: the clean stop below must not wait out the default 10 s spread.
        let cfg =
            config("reboot", &format!("[store]\nfsync = {policy}\n[drain]\nperiod_ms = 200\ndeadline_ms = 2000\n"));
        let args = ["--shards", "1", "--merge-window-ms", "0", "--config", &cfg];
        let (mut edge, _) = EdgeProc::start_on(&dir, &args, "warn");
        let p = Publisher::new(edge.http);
        let mut ws = connect(&edge.url("?room=pc"), None).await;
        let epoch = epoch_of(until_joined(&mut ws).await.last().unwrap());
        let mut ws2 = connect(&edge.url("?room=pd"), None).await;
        let epoch2 = epoch_of(until_joined(&mut ws2).await.last().unwrap());
        for n in 1..=3 {
            gift(&p, "pc", n).await;
            gift(&p, "pd", n).await;
        }
        edge.kill9();
        if reboot {
            // As a reboot would leave it: the run marker names another boot.
            let run = std::fs::read_to_string(dir.join("RUN")).unwrap();
            let other: String = run
                .lines()
                .map(|l| if l.starts_with("boot=") { "boot=another-boot".into() } else { l.to_owned() })
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(dir.join("RUN"), other).unwrap();
        }
        let (edge, log) = EdgeProc::start_on(&dir, &args, "warn");
        let p = Publisher::new(edge.http);
        let (before, _, e, _) = rejoin(&edge, "pc", 3, &epoch, 0).await;
        if renumbered {
            // Through a reader thread: the line may come a moment after the edge is ready.
            wait_until(Duration::from_secs(10), || async { log.lock().unwrap().contains("new epoch") }).await;
        }
        let log = log.lock().unwrap().clone();
        let counted = metric(&p, "roomcast_store_renumbered_total").await;
        assert_eq!(counted, if renumbered { 1.0 } else { 0.0 }, "{policy} reboot={reboot}");
        if renumbered {
            assert!(matches!(&before[..], [ServerMsg::Reset { .. }]), "{policy} reboot={reboot}: {before:?}");
            assert_ne!(e, epoch);
            assert!(log.contains("new epoch"), "{log}");
        } else {
            assert!(before.is_empty(), "{policy} reboot={reboot}: {before:?}");
            assert_eq!(e, epoch);
        }
        assert!(gift(&p, "pc", 4).await > 3, "no seq reused");
        // Room pd was not read in that run: after another restart (clean this time) it still
        // must be renumbered (the first run after the reboot used to forget it).
        let mut edge = edge;
        edge.sigterm();
        assert_eq!(edge.wait_exit(Duration::from_secs(60)), Some(0));
        let (edge, _) = EdgeProc::start_on(&dir, &args, "warn");
        let (before, _, e2, _) = rejoin(&edge, "pd", 3, &epoch2, 0).await;
        if renumbered {
            assert!(matches!(&before[..], [ServerMsg::Reset { .. }]), "{policy} reboot={reboot}, pd: {before:?}");
            assert_ne!(e2, epoch2);
        } else {
            assert!(before.is_empty(), "{policy} reboot={reboot}, pd: {before:?}");
            assert_eq!(e2, epoch2);
        }
        // pc, renumbered once, keeps its new epoch.
        let (before, _, e_again, _) = rejoin(&edge, "pc", 0, &e, 0).await;
        assert!(before.is_empty(), "{policy} reboot={reboot}, pc again: {before:?}");
        assert_eq!(e_again, e);
        drop(edge);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A slow reader catching up on more than the send-queue bound of gifts (`since` replay of
/// ~1.1 MB against a 1 MiB bound) gets all of it: the replay is credit on top of the bound,
/// not a reason to close it as a slow consumer (it was closed with 4000 on every attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_catches_up_on_a_replay_larger_than_the_queue_bound() {
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0"]);
    let p = Publisher::new(edge.http);
    let pad = "g".repeat(1000);
    for n in 0..1100 {
        p.publish("big", "gift", json!({ "n": n, "pad": pad })).await;
    }
    // Raw TCP with a small receive buffer, reading ~300 KB/s.
    let mut s = never_reader(edge.ws, "big&since=0").await;
    let mut total = 0usize;
    let mut buf = vec![0u8; 4096];
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while total < 1_100_000 && std::time::Instant::now() < end {
        match tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut s, &mut buf)).await {
            Ok(Ok(0)) => panic!("closed after {total} bytes"),
            Ok(Ok(n)) => {
                // A close frame from the edge (0x88) with 4000 would end the replay.
                assert!(
                    !buf[..n].windows(4).any(|w| w == [0x88, 0x02, 0x0f, 0xa0]),
                    "closed with 4000 after {total} bytes"
                );
                total += n;
            }
            Ok(Err(e)) => panic!("{e} after {total} bytes"),
            Err(elapsed) => panic!("stalled after {total} bytes ({elapsed})"),
        }
        tokio::time::sleep(Duration::from_millis(12)).await;
    }
    assert!(total >= 1_100_000, "only {total} bytes of the replay");
}

/// A member of a quiet room (nothing published) leaves; the room is forgotten and made anew
/// under another epoch when it comes back with `since=0` and the old epoch. It held nothing, so
/// it is not told `reset` (every returning member of a quiet room was, for nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_at_seq_0_is_not_reset_when_a_quiet_room_comes_back_anew() {
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0"]);
    let mut ws = connect(&edge.url("?room=quiet"), None).await;
    let epoch = epoch_of(until_joined(&mut ws).await.last().unwrap());
    drop(ws);
    // The room held nothing: the edge forgets it once its last member is gone.
    let p = Publisher::new(edge.http);
    assert!(
        wait_until(Duration::from_secs(10), || async { p.get("/v1/rooms/quiet").await.0 == 404 }).await,
        "the quiet room was forgotten"
    );
    let (before, seq, new_epoch, _) = rejoin(&edge, "quiet", 0, &epoch, 0).await;
    assert!(before.is_empty(), "no reset for a client that held nothing: {before:?}");
    assert_eq!(seq, 0);
    assert_ne!(new_epoch, epoch, "the room was made anew (the case this covers)");
    // A client that did hold seqs of the old numbering still is reset.
    gift(&p, "quiet", 1).await;
    let (before, _, _, _) = rejoin(&edge, "quiet", 1, &epoch, 0).await;
    assert!(matches!(&before[..], [ServerMsg::Reset { .. }]), "{before:?}");
}

/// A data directory that comes back with less than it acknowledged: an older copy restored
/// (taken while the edge ran, as a live backup would be, then more gifts, a clean stop, and
/// the copy put back), whole or only its database files. Before, the edge continued the old
/// numbering in the same epoch: a member resuming at a seq the copy has was silently given
/// new messages under seqs it may have held for others. Now every room takes a new epoch:
/// members resuming with their since/epoch get `reset`, loudly logged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_older_copy_of_the_data_dir_resets_members_with_a_new_epoch() {
    for (whole, reason) in [(true, "copied"), (false, "rollback")] {
        let dir = data_dir("restore");
        let old = data_dir("restore-old");
        let args = ["--shards", "1", "--merge-window-ms", "0"];
        let (mut edge, _) = EdgeProc::start_on(&dir, &args, "warn");
        let p = Publisher::new(edge.http);
        let mut ws = connect(&edge.url("?room=show"), None).await;
        let epoch = epoch_of(until_joined(&mut ws).await.last().unwrap());
        for n in 1..=3 {
            gift(&p, "show", n).await;
        }
        let ok = std::process::Command::new("cp").arg("-a").arg(&dir).arg(&old).status().unwrap().success();
        assert!(ok, "cp -a");
        for n in 4..=6 {
            gift(&p, "show", n).await;
        }
        assert_eq!(batch_seqs(&mut ws, 6).await, vec![1, 2, 3, 4, 5, 6]);
        edge.sigterm();
        assert_eq!(edge.wait_exit(Duration::from_secs(30)), Some(0));
        if whole {
            std::fs::remove_dir_all(&dir).unwrap();
            std::fs::rename(&old, &dir).unwrap();
        } else {
            std::fs::remove_dir_all(dir.join("db")).unwrap();
            std::fs::rename(old.join("db"), dir.join("db")).unwrap();
            let _ = std::fs::remove_dir_all(&old);
        }

        let (edge, log) = EdgeProc::start_on(&dir, &args, "warn");
        let p = Publisher::new(edge.http);
        // A member that saw everything, and one that saw only what the copy has: both reset.
        for since in [6, 2] {
            let (before, _, e, _) = rejoin(&edge, "show", since, &epoch, 0).await;
            assert!(
                matches!(&before[..], [ServerMsg::Reset { epoch: r, .. }] if *r == e),
                "whole={whole} since={since}: {before:?}"
            );
            assert_ne!(e, epoch, "whole={whole}: a new epoch");
        }
        wait_until(Duration::from_secs(10), || async {
            let l = log.lock().unwrap();
            l.contains("ERROR") && l.contains("new epoch")
        })
        .await;
        let log = log.lock().unwrap().clone();
        assert!(log.contains("ERROR") && log.contains("new epoch"), "whole={whole}: {log}");
        let (_, text) = p.get("/metrics").await;
        let line = format!("roomcast_store_renumbered_total{{reason=\"{reason}\"}} 1");
        assert!(text.contains(&line), "whole={whole}: no {line}");
        drop(edge);
        let _ = std::fs::remove_dir_all(dir);
    }
}
