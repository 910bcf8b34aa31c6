//! The SSE fallback transport (`GET /sse?room=R`) on the real edge binary, read by a real SSE
//! client (`eventsource-stream` over reqwest's byte stream, the parser the browser's
//! `EventSource` follows): every gift, resume with `Last-Event-ID`, gaps and resets, goaway on
//! drain, and refusals. The browser's own `EventSource` is tested in clients/ts (sse.e2e).

use std::io::{Read, Write};
use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use roomcast_proto::envelope::{self, ServerMsg};
use roomcast_testsupport::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

/// One SSE client: its events, and the last event id it saw (what a browser sends back).
struct Sse {
    events: Events,
    last_id: String,
}

async fn get(url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(url).header("Accept", "text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("http")
}

async fn open(url: &str, headers: &[(&str, &str)]) -> Sse {
    let r = get(url, headers).await;
    assert!(r.status() == 200, "{url}: {} {:?}", r.status(), r.text().await);
    let h = r.headers();
    assert_eq!(h.get("content-type").unwrap(), "text/event-stream");
    assert_eq!(h.get("cache-control").unwrap(), "no-cache");
    assert_eq!(h.get("x-accel-buffering").unwrap(), "no");
    Sse { events: Box::pin(r.bytes_stream().eventsource()), last_id: String::new() }
}

impl Sse {
    /// The next event: its raw data and envelope, or None at the stream's end.
    async fn next_raw(&mut self) -> Option<(String, ServerMsg)> {
        let ev = self.events.next().await?.ok()?;
        if !ev.id.is_empty() {
            self.last_id.clone_from(&ev.id);
        }
        let m = envelope::decode_json(ev.data.as_bytes()).unwrap_or_else(|e| panic!("{e}: {:?}", ev.data));
        Some((ev.data, m))
    }

    /// The next envelope within `d`, skipping batches that carry only an online count.
    async fn next(&mut self, d: Duration) -> Option<ServerMsg> {
        let fut = async {
            loop {
                match self.next_raw().await? {
                    (_, ServerMsg::Batch { messages, online: Some(_), .. }) if messages.is_empty() => {}
                    (_, m) => return Some(m),
                }
            }
        };
        tokio::time::timeout(d, fut).await.ok().flatten()
    }

    async fn joined(&mut self) -> (u64, String) {
        match self.next(T).await {
            Some(ServerMsg::Joined { seq, epoch, .. }) => (seq, epoch),
            other => panic!("expected joined, got {other:?}"),
        }
    }

    /// Gift seqs received until the gift `upto` (panics on anything but batches).
    async fn gifts_upto(&mut self, upto: u64) -> Vec<u64> {
        let mut got = Vec::new();
        while got.last() != Some(&upto) {
            match self.next(T).await {
                Some(ServerMsg::Batch { messages, .. }) => {
                    got.extend(messages.iter().filter(|m| m.kind == "gift").map(|m| m.seq));
                }
                other => panic!("expected gifts up to {upto}, got {other:?} after {got:?}"),
            }
        }
        got
    }

    /// Whether the edge ends the stream within `d`.
    async fn ends_within(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, async { while self.events.next().await.is_some() {} }).await.is_ok()
    }
}

async fn publish_gifts(p: &Publisher, room: &str, n: std::ops::RangeInclusive<u64>) {
    for i in n {
        let seq = p.publish(room, "gift", json!({ "n": i })).await;
        assert_eq!(seq, i, "gift {i}");
    }
}

/// Every gift reaches an SSE member, in the same JSON a WebSocket member gets; after a cut the
/// client resumes with `Last-Event-ID` (as `EPOCH:SEQ`, or a bare seq) and gets exactly the
/// gifts it missed; an explicit `since` wins over the header. Fails without the transport (the
/// edge answered `/sse` 404) or with ids that do not name the batch's last seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gift_arrives_and_last_event_id_resumes_exactly_the_missed_ones() {
    let edge = EdgeProc::start(&["--shards", "2"]);
    let p = Publisher::new(edge.http);
    let url = format!("http://{}/sse?room=show", edge.ws);
    let mut a = open(&url, &[]).await;
    let (seq, epoch) = a.joined().await;
    assert_eq!(seq, 0);
    assert_eq!(a.last_id, format!("{epoch}:0"), "joined says where the member stands");
    // Dispatch names the stream beside the WebSocket URL.
    let (status, route) = p.get("/v1/route?room=show").await;
    assert_eq!(status, 200, "{route}");
    let route: serde_json::Value = serde_json::from_str(&route).unwrap();
    assert_eq!(route["sse"], url.as_str());
    let mut ws = connect(&edge.url("?room=show"), None).await;
    expect_joined(&mut ws, "show").await;
    assert!(wait_until(T, || async { metric(&p, "roomcast_sse_connections").await == 1.0 }).await);
    let (_, health) = p.get("/healthz").await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!((health["connections"].as_i64(), health["sse_connections"].as_i64()), (Some(2), Some(1)));

    publish_gifts(&p, "show", 1..=20).await;
    assert_eq!(a.gifts_upto(20).await, (1..=20).collect::<Vec<_>>());
    assert_eq!(a.last_id, format!("{epoch}:20"));
    // The event's data is byte for byte the WebSocket member's text frame, even where a raw
    // body holds a line break (JSON whitespace: the event splits it into data lines, the
    // client joins them again).
    let raw = b"{\"kind\":\"gift\",\"body\":{\"n\":21,\r\n \"x\":[1,\n2]}}".to_vec();
    assert_eq!(p.post_raw("/v1/rooms/show/messages", raw).await.0, 200);
    let data = loop {
        let (data, _) = a.next_raw().await.unwrap();
        if data.contains("\"seq\":21") {
            break data;
        }
    };
    let text = loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap()
            && t.contains("\"seq\":21")
        {
            break t.to_string();
        }
    };
    assert_eq!(data, text.replace("\r\n", "\n"));
    assert!(data.contains("\"x\":[1,\n2]"), "{data}");
    let resume = a.last_id.clone();
    assert_eq!(resume, format!("{epoch}:21"));

    // Cut: what is published meanwhile comes back with Last-Event-ID, from history (nobody is
    // left in the room to take it live), nothing twice.
    drop(a);
    drop(ws);
    assert!(wait_until(T, || async { metric(&p, "roomcast_connections").await == 0.0 }).await);
    publish_gifts(&p, "show", 22..=25).await;
    let mut b = open(&url, &[("Last-Event-ID", &resume)]).await;
    assert_eq!(b.joined().await, (25, epoch.clone()));
    assert_eq!(b.gifts_upto(25).await, vec![22, 23, 24, 25]);
    assert_eq!(b.last_id, format!("{epoch}:25"));
    publish_gifts(&p, "show", 26..=26).await;
    assert_eq!(b.gifts_upto(26).await, vec![26], "live after the replay, no duplicate at the seam");

    // A bare seq is a since without an epoch; an explicit since wins over the header.
    let mut c = open(&url, &[("Last-Event-ID", "23")]).await;
    c.joined().await;
    assert_eq!(c.gifts_upto(26).await, vec![24, 25, 26]);
    let mut d = open(&format!("{url}&since=25"), &[("Last-Event-ID", &resume)]).await;
    d.joined().await;
    assert_eq!(d.gifts_upto(26).await, vec![26]);
}

/// What history cannot cover is said: a `gap` before the gifts it still has, and a `reset` for
/// a Last-Event-ID of another numbering. Fails if either is silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_and_resets_are_explicit() {
    let cfg = config("sse-gap", "[history]\nmust_deliver = 3\n");
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    let url = format!("http://{}/sse?room=g", edge.ws);
    let mut first = open(&url, &[]).await;
    let (_, epoch) = first.joined().await;
    publish_gifts(&p, "g", 1..=6).await;
    assert_eq!(first.gifts_upto(6).await, (1..=6).collect::<Vec<_>>());

    // Gifts 2 and 3 have left history (3 kept: 4, 5, 6).
    let mut a = open(&url, &[("Last-Event-ID", &format!("{epoch}:1"))]).await;
    assert_eq!(a.joined().await, (6, epoch.clone()));
    assert_eq!(a.next(T).await, Some(ServerMsg::Gap { room: "g".into(), from: 2, to: 3 }));
    assert_eq!(a.gifts_upto(6).await, vec![4, 5, 6]);
    assert_eq!(a.last_id, format!("{epoch}:6"));

    // Another numbering's position: reset first, then this numbering from its start.
    let other = if epoch == "0123456789abcdef" { "fedcba9876543210" } else { "0123456789abcdef" };
    let mut b = open(&url, &[("Last-Event-ID", &format!("{other}:2"))]).await;
    match b.next(T).await {
        Some(ServerMsg::Reset { room, epoch: e, seq: 0, .. }) => {
            assert_eq!((room.as_str(), e.as_str()), ("g", &*epoch));
        }
        other => panic!("expected reset, got {other:?}"),
    }
    assert_eq!(b.joined().await, (6, epoch.clone()));
    assert_eq!(b.next(T).await, Some(ServerMsg::Gap { room: "g".into(), from: 1, to: 3 }));
    assert_eq!(b.gifts_upto(6).await, vec![4, 5, 6]);
    assert_eq!(b.last_id, format!("{epoch}:6"));
}

/// A stream joins like a WebSocket member: the room's count in `joined`, the latest state
/// (a conflated kind's newest message) replayed before live messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_gets_the_online_count_and_latest_state_on_join() {
    let kinds = "[kinds.board]\nmust_deliver = false\nconflate = true\n[kinds.gift]\nmust_deliver = true\n\
                 [kinds.chat]\nmust_deliver = false\n";
    let cfg = config("sse-latest", kinds);
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    p.publish("l", "board", json!({ "top": "a" })).await;
    let last = p.publish("l", "board", json!({ "top": "b" })).await;
    let mut a = open(&format!("http://{}/sse?room=l", edge.ws), &[]).await;
    match a.next(T).await {
        Some(ServerMsg::Joined { online, .. }) => assert_eq!(online, Some(1)),
        other => panic!("expected joined, got {other:?}"),
    }
    match a.next(T).await {
        Some(ServerMsg::Batch { messages, .. }) => {
            let boards: Vec<(u64, &str)> = messages.iter().map(|m| (m.seq, m.body.as_str())).collect();
            assert_eq!(boards, vec![(last, r#"{"top":"b"}"#)]);
        }
        other => panic!("expected the latest state, got {other:?}"),
    }
}

/// A drain sends each SSE member a `goaway` event naming its room's route, then ends the
/// stream. Fails if the stream is cut without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_goaway_then_ends_the_stream() {
    let token = "0123456789abcdef0123";
    let cfg = config("sse-drain", &format!("admin_token = \"{token}\"\n[drain]\nperiod_ms = 300\n"));
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let mut a = open(&format!("http://{}/sse?room=d", edge.ws), &[]).await;
    a.joined().await;
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/admin/drain", edge.http))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "drain accepted: {}", r.status());
    match a.next(T).await {
        Some(ServerMsg::Goaway { url, .. }) => assert!(url.ends_with("/v1/route?room=d"), "{url}"),
        other => panic!("expected goaway, got {other:?}"),
    }
    assert!(a.ends_within(T).await, "the edge ends the stream after the goaway");
}

/// Malformed requests get a 4xx with the reason, are counted, and the edge serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_a_reason() {
    let secret = "test-secret-0123456789abcdef-0123456789";
    let cfg = config(
        "sse-bad",
        &format!("[auth]\nhs256_secret = \"{secret}\"\n[ws]\nallowed_origins = [\"https://ok.example\"]\n"),
    );
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = edge::auth::Claims { sub: "u1".into(), exp: now + 600, rooms: None, publish: None, nbf: None };
    let tok = edge::auth::sign_hs256(secret.as_bytes(), &claims).unwrap();
    let base = format!("http://{}", edge.ws);
    // (path and query, request headers, status, a phrase of the reason)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (format!("/sse?token={tok}"), vec![], 400, "missing room"),
        (format!("/sse?room=a%20b&token={tok}"), vec![], 400, "bad room"),
        (format!("/sse?room=r&since=x&token={tok}"), vec![], 400, "bad since"),
        (format!("/sse?room=r&token={tok}"), vec![("Last-Event-ID", "nope")], 400, "Last-Event-ID"),
        // An epoch other than the edge's 16 lowercase hex digits, in the header or the query:
        // refused, not taken for another numbering (a reset the client did not cause).
        (format!("/sse?room=r&token={tok}"), vec![("Last-Event-ID", "ab:5")], 400, "Last-Event-ID"),
        (format!("/sse?room=r&since=1&epoch=00ab&token={tok}"), vec![], 400, "bad epoch"),
        ("/sse?room=r".into(), vec![], 401, "missing token"),
        (format!("/sse?room=r&token={tok}"), vec![("Origin", "https://evil.example")], 403, "origin"),
    ];
    let n = cases.len() as f64;
    for (path, headers, status, reason) in cases {
        let r = get(&format!("{base}{path}"), &headers).await;
        assert_eq!(r.status().as_u16(), status, "{path}");
        let body = r.text().await.unwrap();
        assert!(body.contains(reason), "{path}: {body}");
    }
    let r = reqwest::Client::new().post(format!("{base}/sse?room=r")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    // Two Last-Event-ID fields: 400, whatever the client library would do with them.
    let mut s = std::net::TcpStream::connect(edge.ws).unwrap();
    s.write_all(b"GET /sse?room=r HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1\r\nLast-Event-ID: 2\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(metric(&p, "roomcast_sse_refused_total").await >= n);

    // The allowed origin gets CORS; the token passes in the query, as EventSource must.
    let r = get(&format!("{base}/sse?room=r&token={tok}"), &[("Origin", "https://ok.example")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get("access-control-allow-origin").unwrap(), "https://ok.example");
    let r = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{base}/sse?room=r"))
        .header("Origin", "https://ok.example")
        .header("Access-Control-Request-Headers", "last-event-id")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(r.headers().get("access-control-allow-origin").unwrap(), "https://ok.example");
}

/// Raw bytes: a `retry:` once, heartbeat comments at the ping interval, and a client that
/// keeps sending after its request is closed rather than read without bound.
#[test]
fn heartbeats_retry_and_client_input_bounds() {
    let cfg = config("sse-raw", "[ws]\nping_interval_ms = 100\n");
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let mut s = std::net::TcpStream::connect(edge.ws).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    s.write_all(b"GET /sse?room=raw HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let count = |v: &[u8], pat: &[u8]| v.windows(pat.len()).filter(|w| *w == pat).count();
    while count(&got, b"\n:\n\n") < 2 {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "stream ended early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert_eq!(count(&got, b"\nretry: "), 1, "{text}");
    assert!(text.contains("data: {\"type\":\"joined\""), "{text}");
    // 64 KiB of input: far past what an event stream's client may send.
    let junk = vec![b'x'; 64 * 1024];
    let _ = s.write_all(&junk);
    let closed = (0..200).any(|_| matches!(s.read(&mut buf), Ok(0) | Err(_)));
    assert!(closed, "the edge closes a stream whose client keeps sending");
}

/// An SSE client (raw TCP, 4 KiB receive buffer) that sends its request and never reads.
async fn never_reading_stream(addr: std::net::SocketAddr, room: &str) -> tokio::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&addr.into()).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut s = tokio::net::TcpStream::from_std(s.into()).unwrap();
    let req = format!("GET /sse?room={room} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes()).await.unwrap();
    s
}

/// A reader that stops reading is held to the WebSocket send-queue bound: closed once over it,
/// while a reader of the same room keeps every gift; it then resumes with `Last-Event-ID` and
/// gets every gift from history. Fails if a stream's queue grows without bound (no close) or a
/// slow stream holds up the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stream_is_closed_by_the_queue_bound_and_resumes_every_gift() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let cfg = config("sse-slow", "[send]\nmax_queue_bytes = 262144\n[fanout]\nmax_batch_bytes = 16384\n");
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "5", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    let url = format!("http://{}/sse?room=slow", edge.ws);
    let mut fast = open(&url, &[]).await;
    let (_, epoch) = fast.joined().await;
    let slow = never_reading_stream(edge.ws, "slow").await;
    assert!(wait_until(T, || async { metric(&p, "roomcast_sse_connections").await == 2.0 }).await);
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let reader = {
        let last = last.clone();
        tokio::spawn(async move {
            let mut got: Vec<u64> = Vec::new();
            while got.last().is_none_or(|&g| g < last.load(Ordering::Relaxed)) {
                match fast.next(Duration::from_secs(30)).await {
                    Some(ServerMsg::Batch { messages, .. }) => {
                        got.extend(messages.iter().filter(|m| m.kind == "gift").map(|m| m.seq));
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            got
        })
    };
    let pad = "g".repeat(4000);
    let mut n = 0u64;
    while metric(&p, "roomcast_slow_consumer_closes_total").await < 1.0 {
        assert!(n < 2000, "the never-reading stream was not closed after {n} gifts");
        n += 1;
        assert_eq!(p.publish("slow", "gift", json!({ "n": n, "pad": pad })).await, n);
    }
    n += 1;
    assert_eq!(p.publish("slow", "gift", json!({ "n": n })).await, n);
    last.store(n, Ordering::Relaxed);
    let got = tokio::time::timeout(Duration::from_secs(60), reader).await.expect("reader").unwrap();
    assert_eq!(got, (1..=n).collect::<Vec<_>>(), "the fast stream got every gift");
    assert!(wait_until(T, || async { metric(&p, "roomcast_sse_connections").await == 0.0 }).await);
    drop(slow);
    // The cut reader comes back from the start of the numbering: every gift, from history.
    let mut again = open(&url, &[("Last-Event-ID", &format!("{epoch}:0"))]).await;
    again.joined().await;
    assert_eq!(again.gifts_upto(n).await, (1..=n).collect::<Vec<_>>());
}
