//! Room engines on the shard threads, through the real edge: no shard cap, signalling order,
//! bounds on what one client can make the edge hold, and a drain that really stops accepting.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;

/// Connections per shard, from /metrics (`roomcast_connections{shard="N"}`).
async fn per_shard(p: &Publisher) -> HashMap<String, f64> {
    let (_, text) = p.get("/metrics").await;
    text.lines()
        .filter(|l| l.starts_with("roomcast_connections{"))
        .filter_map(|l| {
            let shard = l.split("shard=\"").nth(1)?.split('"').next()?.to_owned();
            Some((shard, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// 80 shards on a 2-CPU box (the bus once held interest in a `[u64; 2]`: 64 shards at most, a
/// panic in debug and misdelivery in release beyond). Members are added until every shard holds
/// some; every gift of every room reaches every member once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighty_shards_every_member_gets_every_gift() {
    every_shard_every_gift(&["--shards", "80", "--pin", "false", "--merge-window-ms", "10"], 80).await;
}

/// The same with the engines on threads of their own (`engine.placement = "beside"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_beside_the_shards_deliver_alike() {
    let cfg = config("beside", "[engine]\nplacement = \"beside\"\n");
    every_shard_every_gift(&["--shards", "6", "--pin", "false", "--merge-window-ms", "10", "--config", &cfg], 6).await;
}

async fn every_shard_every_gift(args: &[&str], nshards: usize) {
    let edge = EdgeProc::start(args);
    let publisher = Publisher::new(edge.http);
    let rooms = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"];
    let mut clients = Vec::new();
    // SO_REUSEPORT spreads connections by hash: connect in rounds until all 80 shards have members.
    for round in 0..30 {
        let batch = join_all((0..80).map(|i| {
            let room = rooms[(round * 80 + i) % rooms.len()];
            let url = edge.url(&format!("?room={room}"));
            async move {
                let mut ws = connect(&url, None).await;
                expect_joined(&mut ws, room).await;
                (room, ws)
            }
        }))
        .await;
        clients.extend(batch);
        let shards = per_shard(&publisher).await;
        if shards.len() == nshards && shards.values().all(|&n| n >= 1.0) {
            break;
        }
    }
    let shards = per_shard(&publisher).await;
    assert_eq!(shards.len(), nshards, "every shard reports");
    assert!(shards.values().all(|&n| n >= 1.0), "members on every shard: {shards:?}");

    let gifts = 5u64;
    for room in rooms {
        for n in 0..gifts {
            publisher.publish(room, "gift", json!({ "n": n })).await;
        }
    }
    let results = join_all(clients.into_iter().map(|(room, mut ws)| async move {
        let mut seqs = Vec::new();
        while (seqs.len() as u64) < gifts {
            match next_msg_within(&mut ws, Duration::from_secs(30)).await {
                Some(ServerMsg::Batch { room: r, messages, .. }) => {
                    assert_eq!(r, room);
                    seqs.extend(messages.iter().map(|m| m.seq));
                }
                other => panic!("member of {room}: {other:?} after {seqs:?}"),
            }
        }
        seqs
    }))
    .await;
    let members = results.len();
    for seqs in results {
        assert_eq!(seqs, (1..=gifts).collect::<Vec<_>>(), "each gift once, in order");
    }
    eprintln!("{members} members over {nshards} shards got every gift");
}

/// Join then publish in one write: applied in the order sent (it was answered `not_in_room`,
/// the join still being in flight). The body arrives byte for byte (it was re-encoded:
/// 12345678901234567890123 became 1.2345678901234568e+22).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalling_is_applied_in_order_and_bodies_are_kept_as_sent() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "0"]);
    let mut watcher = connect(&edge.url("?room=b"), None).await;
    expect_joined(&mut watcher, "b").await;
    let mut ws = connect(&edge.url(""), None).await;
    // Several messages in one WebSocket write each: a join, then a publish at once.
    for (room, body) in [("b", "12345678901234567890123"), ("b", "1e2"), ("b", r#"{"a":[1.50, -0, 1E300]}"#)] {
        let join = json!({ "op": "join", "room": room }).to_string();
        let publish = format!(r#"{{"op":"publish","kind":"chat","body":{body}}}"#);
        futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text(join)).await.unwrap();
        futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text(publish)).await.unwrap();
        let mut published = false;
        while !published {
            match next_msg_within(&mut ws, Duration::from_secs(10)).await {
                Some(ServerMsg::Joined { .. } | ServerMsg::Left { .. } | ServerMsg::Batch { .. }) => {}
                Some(ServerMsg::Published { room: r, .. }) => {
                    assert_eq!(r, room);
                    published = true;
                }
                other => panic!("publish after join: {other:?}"),
            }
        }
        let got = match next_msg_within(&mut watcher, Duration::from_secs(10)).await {
            Some(ServerMsg::Batch { messages, .. }) => messages[0].body.clone(),
            other => panic!("watcher: {other:?}"),
        };
        assert_eq!(got, body, "the body as the client sent it");
    }
}

/// A client that sends pings and never reads: every frame queued for it (pongs included)
/// counts against the send queue bound, so it is closed as a slow consumer (once it queued
/// 38 MB of pongs on one connection).
#[test]
fn a_ping_flood_that_never_reads_is_closed_not_buffered() {
    let cfg = config("pingflood", "[send]\nmax_queue_bytes = 131072\n[fanout]\nmax_batch_bytes = 65536\n");
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&edge.ws.into()).unwrap();
    let mut s: std::net::TcpStream = sock.into();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    // A masked (0x80) ping with a 125-byte (0x7d) payload, over and over; never read anything.
    let mut ping = vec![0x89, 0x80 | 0x7d, 1, 2, 3, 4];
    ping.extend((0..125u8).map(|i| i ^ [1, 2, 3, 4][usize::from(i) % 4]));
    let burst: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 64).collect();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0usize;
    let closed = loop {
        if Instant::now() > deadline {
            break false;
        }
        match s.write(&burst) {
            Ok(n) => sent += n,
            // The edge closed (reset) the connection, or stopped reading it for good.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                break true;
            }
            Err(_) => break true,
        }
    };
    assert!(closed, "the edge kept reading pings for 30 s ({sent} bytes) without closing");
    let publisher = Publisher::new(edge.http);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let slow = rt.block_on(async {
        wait_until(Duration::from_secs(10), || async {
            metric(&publisher, "roomcast_slow_consumer_closes_total").await >= 1.0
        })
        .await
    });
    assert!(slow, "counted as a slow-consumer close (sent {sent} bytes of pings)");
    let mut rest = Vec::new();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.read_to_end(&mut rest);
}

/// Joins that would create a room count against `limits.max_rooms_by_joins` (half of
/// `max_rooms` by default), so clients cannot lock the publish API out of new rooms; a room
/// nobody published to is forgotten as soon as its last member leaves (joining and leaving
/// names cannot hold rooms). Signalling floods are bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_respect_the_room_bound_and_signalling_is_rate_limited() {
    let cfg = config("roombound", "[limits]\nmax_rooms = 4\n[ws]\nsignal_rate = 5.0\nsignal_burst = 40.0\n");
    // Several engines: the bound holds for the edge, not per engine (split per engine, 80
    // shards once allowed 8x the rooms).
    let edge = EdgeProc::start(&["--shards", "4", "--config", &cfg]);
    let publisher = Publisher::new(edge.http);
    async fn try_join(ws: &mut Ws, room: &str) -> bool {
        send_json(ws, json!({ "op": "join", "room": room })).await;
        loop {
            match next_msg_within(ws, Duration::from_secs(10)).await {
                Some(ServerMsg::Joined { .. }) => return true,
                Some(ServerMsg::Left { .. }) => {}
                Some(ServerMsg::Error { code, .. }) if code == "join_refused" => return false,
                other => panic!("join {room}: {other:?}"),
            }
        }
    }
    // One member per room: two rooms by joins (half of 4), then refusals.
    let mut members = Vec::new();
    let mut joined = 0;
    for i in 0..5 {
        let mut ws = connect(&edge.url(""), None).await;
        if try_join(&mut ws, &format!("room-{i}")).await {
            joined += 1;
        }
        members.push(ws);
    }
    assert_eq!(joined, 2, "joins create at most max_rooms / 2 rooms");
    // A client switching between names does not keep the rooms it left: each is forgotten as
    // it leaves (on another engine, maybe a moment after the next join is looked at: retry).
    let mut ws = members.remove(0);
    for i in 0..10 {
        let mut ok = false;
        for _ in 0..50 {
            if try_join(&mut ws, &format!("hop-{i}")).await {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "hop {i}: the room it left was not forgotten");
    }
    // The publish API still has room for the back end's rooms, whatever the joins did.
    publisher.publish("backend-1", "gift", json!({"n": 1})).await;
    publisher.publish("backend-2", "gift", json!({"n": 2})).await;
    let mut late = connect(&edge.url(""), None).await;
    assert!(!try_join(&mut late, "one-more").await, "joins may not create past their share");
    // Signalling beyond the burst is refused with rate_limited, and counted.
    for _ in 0..60 {
        send_json(&mut ws, json!({ "op": "leave" })).await;
    }
    let mut limited = 0;
    while let Some(m) = next_msg_within(&mut ws, Duration::from_secs(2)).await {
        if matches!(&m, ServerMsg::Error { code, .. } if code == "rate_limited") {
            limited += 1;
        }
    }
    assert!(limited >= 10, "60 signals at once with a burst of 40: {limited} refused");
    assert!(metric(&publisher, "roomcast_signals_refused_total").await >= 16.0);
    // Going on past a burst's worth of refusals is a flood: closed with 1008.
    for _ in 0..200 {
        if futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text(r#"{"op":"leave"}"#))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(close_code(&mut ws, Duration::from_secs(10)).await, Some(1008), "a signalling flood is closed");
}

/// A drain closes the listeners: new connections are refused by the kernel, not accepted and
/// dropped with EOF (the multishot accept, cancelled by fd after the fd was closed, kept the
/// listening socket alive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_edge_refuses_new_connections() {
    let cfg = config("drainlisten", "admin_token = \"0123456789abcdef0123\"\n[drain]\nperiod_ms = 20000\n");
    let edge = EdgeProc::start(&["--shards", "2", "--config", &cfg]);
    // A member stays connected through the drain period.
    let mut member = connect(&edge.url("?room=x"), None).await;
    expect_joined(&mut member, "x").await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("http://{}/v1/admin/drain", edge.http))
        .bearer_auth("0123456789abcdef0123")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "drain accepted: {}", r.status());
    let ws = edge.ws;
    let refused = wait_until(Duration::from_secs(10), || async move {
        matches!(std::net::TcpStream::connect(ws), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .await;
    assert!(refused, "a drained edge must refuse connections");
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = format!(":{:04X} ", ws.port());
    assert!(
        !tcp.lines().any(|l| l.split_whitespace().nth(1).is_some_and(|a| format!("{a} ").ends_with(&port))
            && l.split_whitespace().nth(3) == Some("0A")),
        "no listener left on the port"
    );
}

/// Connections that close while the shard is out of receive buffers are all released: a
/// closing connection whose multishot recv ended with ENOBUFS (not ECANCELED) was never closed,
/// its slot leaked for good. 16 receive buffers for 150 clients that flood pings, never read,
/// and then reset.
#[test]
fn connections_closing_while_receive_buffers_run_out_are_released() {
    let cfg = config("enobufs", "[uring]\nrecv_buffers = 16\nrecv_buffer_size = 512\n");
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let ws = edge.ws;
    let stop = Instant::now() + Duration::from_secs(3);
    let clients: Vec<_> = (0..150)
        .map(|_| {
            std::thread::spawn(move || {
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                sock.set_recv_buffer_size(4096).unwrap();
                sock.connect(&ws.into()).unwrap();
                let mut s: std::net::TcpStream = sock.into();
                let _ = s.write_all(
                    b"GET /ws?room=flood HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                );
                let ping = [0x89u8, 0x84, 1, 2, 3, 4, b'p' ^ 1, b'i' ^ 2, b'n' ^ 3, b'g' ^ 4];
                let burst: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 200).collect();
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                while Instant::now() < stop {
                    if s.write_all(&burst).is_err() {
                        break;
                    }
                }
                // Reset, not FIN: the edge's sends fail while its receives may still be armed.
                let sock = socket2::Socket::from(s);
                let _ = sock.set_linger(Some(Duration::ZERO));
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let publisher = Publisher::new(edge.http);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let released = rt.block_on(async {
        wait_until(Duration::from_secs(15), || async { metric(&publisher, "roomcast_connections").await == 0.0 }).await
    });
    let left = rt.block_on(metric(&publisher, "roomcast_connections"));
    assert!(released, "{left} connections never released");
    // The edge still serves.
    rt.block_on(async {
        let mut ws = connect(&edge.url("?room=after"), None).await;
        expect_joined(&mut ws, "after").await;
    });
}
