//! Every bad input gets its answer, and the other connections keep receiving.

use std::time::Duration;

use futures_util::SinkExt;
use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends raw bytes, returns everything the edge sends back before closing. Fails if the edge
/// has not closed the connection within 10 s (a reset after its answer counts as closed).
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Ok(Ok(0)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Ok(Err(e)) => panic!("reading the edge's answer: {e}"),
            Err(elapsed) => panic!(
                "the edge did not close the connection within 10 s ({elapsed}); it sent {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

fn upgrade(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Masked client frame.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    roomcast_proto::ws::encode_client_frame(
        match first & 0x0f {
            1 => roomcast_proto::ws::OpCode::Text,
            2 => roomcast_proto::ws::OpCode::Binary,
            _ => unreachable!(),
        },
        payload,
        [1, 2, 3, 4],
    )
}

/// The close code in the server's close frame, after the 101 response.
fn close_code_in(bytes: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(bytes);
    let end = text.find("\r\n\r\n")? + 4;
    let mut f = &bytes[end..];
    // Skip frames until the close frame (opcode 8).
    while f.len() >= 2 {
        let len = (f[1] & 0x7f) as usize;
        let (hdr, len) = if len == 126 { (4, u16::from_be_bytes([f[2], f[3]]) as usize) } else { (2, len) };
        if f[0] & 0x0f == 8 {
            return Some(u16::from_be_bytes([f[hdr], f[hdr + 1]]));
        }
        f = &f[hdr + len..];
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_answers_and_others_keep_receiving() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "0", "--max-message", "4096"]);
    let publisher = Publisher::new(edge.http);
    let mut bystander = connect(&edge.url("?room=calm"), None).await;
    expect_joined(&mut bystander, "calm").await;

    // Malformed handshakes: HTTP 4xx with a reason.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        (upgrade("/nope").into_bytes(), "HTTP/1.1 404"),
        (upgrade("/ws?room=bad%20room").into_bytes(), "HTTP/1.1 400"),
        (upgrade("/ws?room=ok&since=x").into_bytes(), "HTTP/1.1 400"),
        (upgrade("/ws").replace("Version: 13", "Version: 8").into_bytes(), "HTTP/1.1 426"),
        (upgrade("/ws").replace("Upgrade: websocket\r\n", "").into_bytes(), "HTTP/1.1 400"),
        (upgrade("/ws").replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").into_bytes(), "HTTP/1.1 400"),
        (
            format!("GET /ws HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(roomcast_proto::handshake::MAX_REQUEST + 1))
                .into_bytes(),
            "HTTP/1.1 431",
        ),
    ];
    for (req, want) in cases {
        let resp = raw_exchange(edge.ws, &req).await;
        let text = String::from_utf8_lossy(&resp);
        assert!(
            text.starts_with(want),
            "request {:?}: got {text:?}",
            String::from_utf8_lossy(&req[..req.len().min(60)])
        );
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(!body.trim().is_empty(), "a reason in the body: {text:?}");
    }

    // Protocol violations: the right close code.
    let open = upgrade("/ws?room=calm").into_bytes();
    let mut unmasked = open.clone();
    unmasked.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
    assert_eq!(close_code_in(&raw_exchange(edge.ws, &unmasked).await), Some(1002), "unmasked frame");
    let mut bad_utf8 = open.clone();
    bad_utf8.extend_from_slice(&client_frame(0x81, &[0xff, 0xfe, 0xfd]));
    assert_eq!(close_code_in(&raw_exchange(edge.ws, &bad_utf8).await), Some(1007), "invalid UTF-8");
    let mut too_big = open.clone();
    too_big.extend_from_slice(&client_frame(0x82, &vec![0u8; 5000]));
    assert_eq!(close_code_in(&raw_exchange(edge.ws, &too_big).await), Some(1009), "over max message");
    let mut reserved = open.clone();
    reserved.extend_from_slice(&[0x83, 0x80, 0, 0, 0, 0]);
    assert_eq!(close_code_in(&raw_exchange(edge.ws, &reserved).await), Some(1002), "reserved opcode");

    // Unknown signalling: an error message, the connection stays open.
    let mut ws = connect(&edge.url("?room=calm"), None).await;
    expect_joined(&mut ws, "calm").await;
    send_json(&mut ws, json!({"op": "dance"})).await;
    match next_msg_within(&mut ws, Duration::from_secs(5)).await {
        Some(ServerMsg::Error { code, .. }) => assert_eq!(code, "bad_message"),
        other => panic!("{other:?}"),
    }
    ws.send(Message::text("not json at all")).await.unwrap();
    assert!(matches!(next_msg_within(&mut ws, Duration::from_secs(5)).await, Some(ServerMsg::Error { .. })));
    send_json(&mut ws, json!({"op": "join", "room": "no spaces"})).await;
    match next_msg_within(&mut ws, Duration::from_secs(5)).await {
        Some(ServerMsg::Error { code, .. }) => assert_eq!(code, "bad_room"),
        other => panic!("{other:?}"),
    }

    // Bad publish requests: 4xx with a reason.
    let ok = json!({"kind": "chat", "body": 1}).to_string().into_bytes();
    let cases: Vec<(String, Vec<u8>, u16)> = vec![
        ("/v1/rooms/calm/messages".into(), b"{not json".to_vec(), 400),
        ("/v1/rooms/calm/messages".into(), br#"{"kind":"chat"}"#.to_vec(), 400),
        ("/v1/rooms/calm/messages".into(), br#"{"kind":"Chat!","body":1}"#.to_vec(), 400),
        ("/v1/rooms/calm/messages".into(), br#"{"kind":"chat","body":1,"extra":2}"#.to_vec(), 400),
        (format!("/v1/rooms/{}/messages", "r".repeat(65)), ok.clone(), 400),
        ("/v1/rooms/bad$room/messages".into(), ok.clone(), 400),
        (
            "/v1/rooms/calm/messages".into(),
            format!(r#"{{"kind":"chat","body":"{}"}}"#, "x".repeat(70_000)).into_bytes(),
            413,
        ),
        // No such endpoint, or not this method: a reason too, not an empty body (found by a
        // new user's trial).
        ("/v1/nowhere".into(), ok.clone(), 404),
        ("/v1/rooms/calm/bans/a/b".into(), ok.clone(), 404),
        ("/metrics".into(), ok.clone(), 405),
    ];
    for (path, body, want) in cases {
        let (status, v) = publisher.post_raw(&path, body).await;
        assert_eq!(status, want, "{path}: {v}");
        if want != 413 {
            assert!(v["error"].as_str().is_some_and(|s| !s.is_empty()), "reason for {path}: {v}");
        }
    }

    // After all that, the bystander still gets every message.
    for n in 0..10 {
        let seq = publisher.publish("calm", "gift", json!(n)).await;
        match next_msg_within(&mut bystander, Duration::from_secs(5)).await {
            Some(ServerMsg::Batch { messages, .. }) => assert_eq!(messages[0].seq, seq),
            other => panic!("bystander: {other:?}"),
        }
    }
    assert!(metric(&publisher, "roomcast_protocol_errors_total").await >= 4.0);
    assert!(metric(&publisher, "roomcast_handshake_failures_total").await >= 8.0);
    // ... and by the status answered.
    let (_, text) = publisher.get("/metrics").await;
    let refused = |status: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("roomcast_handshake_refusals_total{") && l.contains(&format!("status=\"{status}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    for (status, least) in [("400", 4.0), ("404", 1.0), ("426", 1.0), ("431", 1.0)] {
        assert!(refused(status) >= least, "handshake_refusals_total{{status={status}}}: {}", refused(status));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_time_out() {
    let dir = roomcast_testsupport::scratch().join(format!("roomcast-timeouts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("edge.toml");
    std::fs::write(&cfg, "[ws]\nhandshake_timeout_ms = 300\nidle_timeout_ms = 600\nping_interval_ms = 0\n").unwrap();
    let edge = EdgeProc::start(&["--shards", "1", "--config", cfg.to_str().unwrap()]);
    // Never sends a request: cut after the handshake timeout (raw_exchange fails if the edge
    // never closes), with nothing sent.
    let resp = raw_exchange(edge.ws, b"").await;
    assert!(resp.is_empty(), "{:?}", String::from_utf8_lossy(&resp));
    // Upgraded but silent: closed with 1001 after the idle timeout. tungstenite answers pings
    // but sends nothing on its own, so the edge sees an idle connection.
    let mut ws = connect(&edge.url("?room=idle"), None).await;
    expect_joined(&mut ws, "idle").await;
    assert_eq!(close_code(&mut ws, Duration::from_secs(10)).await, Some(1001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_a_connection_alive_and_are_answered() {
    let dir = roomcast_testsupport::scratch().join(format!("roomcast-pings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("edge.toml");
    std::fs::write(&cfg, "[ws]\nidle_timeout_ms = 800\nping_interval_ms = 200\n").unwrap();
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0", "--config", cfg.to_str().unwrap()]);
    let publisher = Publisher::new(edge.http);
    let mut ws = connect(&edge.url("?room=p"), None).await;
    expect_joined(&mut ws, "p").await;
    // Our pong answers (sent by tungstenite while we read) keep us alive past the idle timeout.
    ws.send(Message::Ping(b"hello".to_vec().into())).await.unwrap();
    // Read for more than twice the idle timeout: the edge's pings (every 200 ms) and our pongs
    // must keep the connection up the whole time.
    let (mut pong, mut pings) = (false, 0);
    let end = std::time::Instant::now() + Duration::from_millis(2000);
    while std::time::Instant::now() < end {
        use futures_util::StreamExt;
        match tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => pong |= &p[..] == b"hello",
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => panic!("closed while answering pings"),
            _ => {}
        }
    }
    assert!(pong, "the edge answers pings with the same payload");
    assert!(pings >= 1, "the edge pings a connection that sends nothing (interval 200 ms, read for 2 s)");
    let seq = publisher.publish("p", "chat", json!(1)).await;
    match next_msg_within(&mut ws, Duration::from_secs(5)).await {
        Some(ServerMsg::Batch { messages, .. }) => assert_eq!(messages[0].seq, seq),
        other => panic!("{other:?}"),
    }
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = roomcast_testsupport::scratch().join(format!("roomcast-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[fanout]\nmerge_window_ms = 99999\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["--check-config", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fanout.merge_window_ms"), "{err}");
    std::fs::write(&cfg, "[ws]\nmax_mesage = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["--check-config", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_mesage"));
    std::fs::write(&cfg, "shards = 2\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["--check-config", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// A negative number (or a bad token lifetime) given to a flag is refused naming that flag,
/// with status 2 and no panic; clap used to answer "unexpected argument '-5'" without the flag.
/// A flag missing its value does not take the next flag as one (`--ttl --sub u`).
#[test]
fn a_negative_number_to_a_flag_is_refused_naming_the_flag() {
    let cases: [&[&str]; 10] = [
        &["--check-config", "--shards", "-5"],
        &["--check-config", "--merge-window-ms", "-1"],
        &["--check-config", "--max-message", "-1"],
        &["--check-config", "--max-queue-bytes", "-1"],
        &["--check-config", "--min-replicas-acked", "-1"],
        &["--check-config", "--drain-period-ms", "-100"],
        &["dispatch", "--redis", "redis://127.0.0.1:1", "--backlog", "-3"],
        &["token", "--sub", "u", "--ttl", "-1"],
        &["token", "--sub", "u", "--ttl", "0"],
        &["token", "--sub", "u", "--ttl", "1y"],
    ];
    for args in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
            .args(args)
            .env("ROOMCAST_AUTH_SECRET", "0123456789abcdef0123456789abcdef")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let flag = args.iter().rev().nth(1).unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains(flag) && !err.contains("unexpected argument"), "{args:?} must name {flag}: {err}");
    }
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_edge")).args(["token", "--ttl", "--sub", "u"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--ttl") && err.contains("value"), "{err}");
}

/// What a raw client that reads everything and never writes (so never answers a ping) saw:
/// pings, message frames, and when the edge closed it (ms after it started reading).
#[derive(Debug, Default)]
struct Silent {
    pings: Vec<u64>,
    messages: Vec<u64>,
    closed_at: Option<u64>,
}

/// Reads `s` (its upgrade answer, then frames) until the edge closes it or `for_ms` passes.
async fn read_silently(mut s: TcpStream, for_ms: u64) -> Silent {
    use roomcast_proto::ws::{OpCode, parse_header};
    let start = std::time::Instant::now();
    let (mut buf, mut out) = (Vec::new(), Silent::default());
    let mut upgraded = false;
    let mut tmp = vec![0u8; 16 * 1024];
    while start.elapsed() < Duration::from_millis(for_ms) {
        let n = match tokio::time::timeout(Duration::from_millis(50), s.read(&mut tmp)).await {
            Err(_) => continue,
            Ok(Ok(0) | Err(_)) => {
                out.closed_at.get_or_insert(start.elapsed().as_millis() as u64);
                break;
            }
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&tmp[..n]);
        if !upgraded {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            assert!(buf.starts_with(b"HTTP/1.1 101"), "{:?}", String::from_utf8_lossy(&buf));
            buf.drain(..end + 4);
            upgraded = true;
        }
        while let Ok(Some(h)) = parse_header(&buf) {
            let total = h.header_len + h.payload_len as usize;
            if buf.len() < total {
                break;
            }
            let at = start.elapsed().as_millis() as u64;
            match h.opcode {
                OpCode::Ping => out.pings.push(at),
                OpCode::Close => {
                    out.closed_at.get_or_insert(at);
                }
                _ => out.messages.push(at),
            }
            buf.drain(..total);
        }
    }
    out
}

/// A member taking its room's messages is not pinged and is not idle, though it never answers
/// a ping; once the room falls quiet it is pinged again and, not answering, closed as idle.
/// A member of a quiet room that does not answer is closed as idle as before. The input: the
/// 10^6 run, where pings every 30 s were a third of a gift's writes and 840,681 members who
/// were reading, behind, answered late and were closed as idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_taking_messages_needs_no_ping_and_is_not_idle() {
    let cfg = config("busy-pings", "[ws]\nidle_timeout_ms = 800\nping_interval_ms = 200\n");
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0", "--config", &cfg]);
    let publisher = Publisher::new(edge.http);
    let busy = tokio::spawn(read_silently(never_reader(edge.ws, "busy").await, 6000));
    let quiet = tokio::spawn(read_silently(never_reader(edge.ws, "quiet").await, 6000));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A message every 100 ms for 3 s: almost four idle timeouts.
    for n in 0..30 {
        publisher.publish("busy", "chat", json!(n)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (busy, quiet) = (busy.await.unwrap(), quiet.await.unwrap());
    let last = *busy.messages.last().expect("the busy member got the room's messages");
    assert!(busy.messages.len() >= 30, "{busy:?}");
    let first = busy.messages[1];
    // While the room's messages flowed: no ping (the first message frame is `joined`).
    let during: Vec<u64> = busy.pings.iter().copied().filter(|&t| t > first + 250 && t < last).collect();
    assert!(during.is_empty(), "pinged while taking a message every 100 ms: {busy:?}");
    let closed = busy.closed_at.expect("closed as idle once the room fell quiet");
    assert!(closed > last, "not closed while taking messages: {busy:?}");
    assert!(busy.pings.iter().any(|&t| t > last), "pinged again once quiet: {busy:?}");
    // The quiet room's member: pinged, never answered, closed after the idle timeout.
    assert!(quiet.pings.len() >= 2, "{quiet:?}");
    let q = quiet.closed_at.expect("the quiet member, who never answered, was closed");
    assert!(q < first + 2000, "closed as idle about 800 ms after its last word: {quiet:?}");
    // A close is counted when its lingering ends (the peer's FIN, or ws.close_linger_ms): after
    // the member saw the close frame, so wait for the count (a CI rehearsal read 1 here).
    let counted = || async { metric(&publisher, "roomcast_connections_closed_total").await >= 2.0 };
    assert!(
        wait_until(Duration::from_secs(10), counted).await,
        "{}",
        metric(&publisher, "roomcast_connections_closed_total").await
    );
}

/// The kernel caps a listen backlog at net.core.somaxconn without a word; an edge configured
/// deeper than that says so at start (the 10^6 reconnect storm overflowed queues it believed
/// were 65,535 deep), and one within it does not.
#[test]
fn a_backlog_above_somaxconn_is_named_at_start() {
    let cap: i64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    for (backlog, warned) in [(cap + 1, true), (cap, false)] {
        let cfg = config(&format!("backlog-{backlog}"), &format!("[ws]\nbacklog = {backlog}\n"));
        let data = data_dir("backlog");
        let (edge, log) = EdgeProc::start_on(&data, &["--config", &cfg, "--shards", "1"], "warn");
        drop(edge);
        let _ = std::fs::remove_dir_all(&data);
        // The log is read by a thread: let it take the last lines.
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !log.lock().unwrap().contains("net.core.somaxconn") && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = log.lock().unwrap().clone();
        assert_eq!(log.contains("net.core.somaxconn"), warned, "backlog {backlog}, somaxconn {cap}: {log}");
    }
}

/// `--check-config` says what start-up would: a backlog above net.core.somaxconn is named (as a
/// warning: the status stays 0, the configuration is valid), and one within it is not.
#[test]
fn check_config_names_a_backlog_above_somaxconn() {
    let cap: i64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    for (backlog, warned) in [(cap + 1, true), (cap, false)] {
        let cfg = config(&format!("check-backlog-{backlog}"), &format!("[ws]\nbacklog = {backlog}\n"));
        let out = std::process::Command::new(edge_bin()).args(["--check-config", "--config", &cfg]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "a warning, not an error: {err}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));
        assert_eq!(err.contains("net.core.somaxconn"), warned, "backlog {backlog}, somaxconn {cap}: {err}");
        if warned {
            assert!(err.contains(&format!("ws.backlog {backlog} is above net.core.somaxconn {cap}")), "{err}");
        }
    }
}

/// `edge dispatch --backlog` above net.core.somaxconn is named at start too (said before
/// Redis is reached, so an unusable Redis URL ends the run at once here); within it, nothing.
#[test]
fn a_dispatch_backlog_above_somaxconn_is_named_at_start() {
    let cap: i64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    for (backlog, warned) in [(cap + 1, true), (cap, false)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
            .args([
                "dispatch",
                "--redis",
                "not-a-redis-url",
                "--http",
                "127.0.0.1:0",
                "--backlog",
                &backlog.to_string(),
            ])
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "no Redis, no dispatch: {err}");
        assert_eq!(err.contains("net.core.somaxconn"), warned, "backlog {backlog}, somaxconn {cap}: {err}");
    }
}

/// `edge dispatch` with Redis down at start says why once (a new user's trial: the cause was
/// printed twice, "Connection refused (os error 111): Connection refused (os error 111)"), and
/// its help names every endpoint it serves, `/metrics` included.
#[test]
fn dispatch_says_once_why_it_cannot_start_and_its_help_names_metrics() {
    // A port nothing listens on: taken, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["dispatch", "--redis", &format!("redis://127.0.0.1:{port}"), "--http", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "no Redis, no dispatch: {err}");
    assert!(err.contains("cannot connect to redis"), "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "the cause once: {err}");

    let help = std::process::Command::new(env!("CARGO_BIN_EXE_edge")).args(["dispatch", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for endpoint in ["/v1/route", "/metrics", "/healthz"] {
        assert!(help.contains(endpoint), "{endpoint} in: {help}");
    }
}

/// The HTTP API's listener gets `ws.backlog` too, not tokio's 1,024: in a reconnect storm every
/// client asks `/v1/route` on a new connection first (a 2x10^5 storm overflowed 1,024). `ss`
/// shows a listener's backlog as its Send-Q.
#[test]
fn the_http_listener_takes_the_configured_backlog() {
    let cap: i64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    let backlog = 1777.min(cap);
    let cfg = config("http-backlog", &format!("[ws]\nbacklog = {backlog}\n"));
    let edge = EdgeProc::start(&["--config", &cfg, "--shards", "1"]);
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", edge.http.port())])
        .output()
        .expect("ss (iproute2, installed by scripts/setup.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    let send_q: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    assert_eq!(send_q, [backlog.to_string()], "ss: {text}");
}
