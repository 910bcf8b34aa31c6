//! Trust through the real edge: identity from a signed token, who may publish which kind,
//! rooms a token allows, refresh and expiry, origins, and the anonymous quick start.

use std::time::Duration;

use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const SECRET: &str = "test-secret-0123456789abcdef-0123456789";

fn token(sub: &str, ttl_s: i64, rooms: &[&str], publish: &[&str]) -> String {
    let now = roomcast_now_s() as i64;
    let claims = edge::auth::Claims {
        sub: sub.into(),
        exp: (now + ttl_s) as u64,
        rooms: (!rooms.is_empty()).then(|| rooms.iter().map(ToString::to_string).collect()),
        publish: (!publish.is_empty()).then(|| publish.iter().map(ToString::to_string).collect()),
        nbf: None,
    };
    edge::auth::sign_hs256(SECRET.as_bytes(), &claims).unwrap()
}

fn roomcast_now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// The status line of an upgrade attempt (101 or the refusal).
async fn status(url: &str, origin: Option<&str>) -> u16 {
    let mut req = url.into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", HeaderValue::from_str(o).unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

/// Reads until a batch arrives; returns its messages as (kind, user, body).
async fn next_batch(ws: &mut Ws) -> Vec<(String, String, String)> {
    loop {
        match next_msg_within(ws, Duration::from_secs(10)).await {
            Some(ServerMsg::Batch { messages, .. }) => {
                return messages.into_iter().map(|m| (m.kind, m.user, m.body)).collect();
            }
            Some(_) => {}
            None => panic!("no batch"),
        }
    }
}

/// Reads until an `error` or `published` answer arrives.
async fn answer(ws: &mut Ws) -> ServerMsg {
    loop {
        match next_msg_within(ws, Duration::from_secs(10)).await {
            Some(m @ (ServerMsg::Error { .. } | ServerMsg::Published { .. } | ServerMsg::Refreshed { .. })) => {
                return m;
            }
            Some(_) => {}
            None => panic!("no answer"),
        }
    }
}

/// The quick start (no auth configured): anonymous ids, client kinds only. A forged gift over
/// the socket is refused and reaches nobody; a client's `user` is never used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_mode_cannot_forge_gifts_or_users() {
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "0"]);
    let publisher = Publisher::new(edge.http);
    let mut watcher = connect(&edge.url("?room=lobby"), None).await;
    expect_joined(&mut watcher, "lobby").await;
    let mut ws = connect(&edge.url("?room=lobby"), None).await;
    expect_joined(&mut ws, "lobby").await;
    send_json(&mut ws, json!({"op":"publish","kind":"gift","user":"alice","body":{"rose":1000}})).await;
    match answer(&mut ws).await {
        ServerMsg::Error { code, .. } => assert_eq!(code, "publish_forbidden"),
        other => panic!("a forged gift was accepted: {other:?}"),
    }
    send_json(&mut ws, json!({"op":"publish","kind":"system","body":"room closed by moderator"})).await;
    assert!(matches!(answer(&mut ws).await, ServerMsg::Error { code, .. } if code == "publish_forbidden"));
    send_json(&mut ws, json!({"op":"publish","kind":"chat","user":"alice","body":"hi"})).await;
    assert!(matches!(answer(&mut ws).await, ServerMsg::Published { .. }));
    // The watcher gets the chat only, under the server's anonymous id.
    let got = next_batch(&mut watcher).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "chat");
    assert!(got[0].1.starts_with("anon-"), "server-made user, not the client's: {:?}", got[0].1);
    // Gifts still come from the publish API.
    publisher.publish("lobby", "gift", json!({"rose":1})).await;
    assert_eq!(next_batch(&mut watcher).await[0].0, "gift");
    assert!(metric(&publisher, "roomcast_connections_refused_total").await >= 2.0, "refusals counted");
}

/// With a key configured: no token, a forged or expired token get 401; a valid one connects
/// (query or Authorization header); its rooms and pub claims are enforced; the user is `sub`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_connects_joins_and_publishes() {
    let cfg = config("trust-tokens", &format!("[auth]\nhs256_secret = \"{SECRET}\"\n"));
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "0", "--config", &cfg]);
    let base = edge.url("?room=show-1");
    assert_eq!(status(&base, None).await, 401, "no token");
    assert_eq!(status(&format!("{base}&token=not.a.jwt"), None).await, 401, "garbage");
    let forged = {
        let c = edge::auth::Claims {
            sub: "mallory".into(),
            exp: roomcast_now_s() + 600,
            rooms: None,
            publish: None,
            nbf: None,
        };
        edge::auth::sign_hs256(b"another-secret-0123456789abcdef-0123", &c).unwrap()
    };
    assert_eq!(status(&format!("{base}&token={forged}"), None).await, 401, "wrong signature");
    assert_eq!(status(&format!("{base}&token={}", token("bob", -60, &[], &[])), None).await, 401, "expired");
    assert_eq!(
        status(&format!("{base}&token={}", token("bob", 600, &["lobby"], &[])), None).await,
        403,
        "a room outside the token's rooms"
    );

    let mut watcher = connect(&format!("{base}&token={}", token("watcher", 600, &["show-*"], &[])), None).await;
    expect_joined(&mut watcher, "show-1").await;
    // A native client: Authorization: Bearer.
    let mut req = edge.url("?room=show-1").into_client_request().unwrap();
    let t = token("alice", 600, &["show-*"], &["gift", "chat"]);
    req.headers_mut().insert("Authorization", HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
    let (mut alice, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    expect_joined(&mut alice, "show-1").await;
    // The token's pub claim lets alice send gifts; the user is hers whatever she writes.
    send_json(&mut alice, json!({"op":"publish","kind":"gift","user":"bob","body":{"rose":3}})).await;
    assert!(matches!(answer(&mut alice).await, ServerMsg::Published { .. }));
    let got = next_batch(&mut watcher).await;
    assert_eq!((got[0].0.as_str(), got[0].1.as_str(), got[0].2.as_str()), ("gift", "alice", r#"{"rose":3}"#));
    // The watcher's token has no pub claim: client kinds only.
    send_json(&mut watcher, json!({"op":"publish","kind":"gift","body":1})).await;
    assert!(matches!(answer(&mut watcher).await, ServerMsg::Error { code, .. } if code == "publish_forbidden"));
    // Joining a room outside the token's rooms: an error, no join.
    send_json(&mut alice, json!({"op":"join","room":"lobby"})).await;
    assert!(matches!(answer(&mut alice).await, ServerMsg::Error { code, .. } if code == "room_forbidden"));
    send_json(&mut alice, json!({"op":"publish","kind":"chat","body":"still in show-1"})).await;
    match answer(&mut alice).await {
        ServerMsg::Published { room, .. } => assert_eq!(room, "show-1"),
        other => panic!("{other:?}"),
    }
}

/// A token refreshed before `exp` keeps the connection; one that is not is told and closed 4001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_a_connection_past_its_first_exp() {
    let cfg = config("trust-refresh", &format!("[auth]\nhs256_secret = \"{SECRET}\"\nleeway_s = 0\n"));
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0", "--config", &cfg]);
    let publisher = Publisher::new(edge.http);
    let mut keeps = connect(&edge.url(&format!("?room=r&token={}", token("keeper", 3, &[], &[]))), None).await;
    expect_joined(&mut keeps, "r").await;
    let mut lapses = connect(&edge.url(&format!("?room=r&token={}", token("lapser", 3, &[], &[]))), None).await;
    expect_joined(&mut lapses, "r").await;
    // A refresh for another user is refused.
    send_json(&mut keeps, json!({"op":"refresh","token": token("someone-else", 600, &[], &[])})).await;
    assert!(matches!(answer(&mut keeps).await, ServerMsg::Error { code, .. } if code == "refresh_refused"));
    send_json(&mut keeps, json!({"op":"refresh","token": token("keeper", 600, &[], &[])})).await;
    match answer(&mut keeps).await {
        ServerMsg::Refreshed { exp } => assert!(exp > roomcast_now_s() + 500),
        other => panic!("{other:?}"),
    }
    // The lapsing one is told and closed with 4001.
    let mut told = false;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(&mut lapses)).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                told |= t.contains("token_expired");
            }
            Ok(Some(Ok(Message::Close(Some(f))))) => break Some(u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            _ => break None,
        }
    };
    assert!(told, "an error token_expired before the close");
    assert_eq!(code, Some(4001));
    // The refreshed one is still served after its first exp.
    publisher.publish("r", "gift", json!({"after":"exp"})).await;
    assert_eq!(next_batch(&mut keeps).await[0].2, r#"{"after":"exp"}"#);
    let _ = keeps.close(None).await;
}

/// With an allow-list, a page from another origin gets 403; listed and wildcard subdomains
/// connect; a client without Origin (not a browser) is left to the token checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_outside_the_allow_list_get_403() {
    let cfg =
        config("trust-origin", "[ws]\nallowed_origins = [\"https://live.example.com\", \"https://*.example.org\"]\n");
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let url = edge.url("?room=r");
    assert_eq!(status(&url, Some("https://evil.test")).await, 403);
    assert_eq!(status(&url, Some("https://example.org")).await, 403);
    assert_eq!(status(&url, Some("https://live.example.com")).await, 101);
    assert_eq!(status(&url, Some("https://m.example.org")).await, 101);
    assert_eq!(status(&url, None).await, 101);
}

/// A token secret that is set but empty or short is a configuration error, never "auth off"
/// (an empty ROOMCAST_AUTH_SECRET used to start the edge with no auth at all); `--check-config`
/// says so too.
#[test]
fn an_empty_or_short_secret_in_the_environment_refuses_to_start() {
    for secret in ["", "short"] {
        let out = std::process::Command::new(edge_bin())
            .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--check-config"])
            .env("ROOMCAST_AUTH_SECRET", secret)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{secret:?}: {err}");
        assert!(err.contains("ROOMCAST_AUTH_SECRET"), "{err}");
        assert!(!err.contains("short") || secret.is_empty(), "the value is not echoed: {err}");
    }
}

/// An upgrade attempt from the source address `src`: 101, the refusal's status, or 0 when the
/// edge closed the connection before an answer could be read.
async fn status_from(src: &str, url: &str) -> (u16, Option<Ws>) {
    let req = url.into_client_request().unwrap();
    let host = req.uri().authority().unwrap().as_str().to_owned();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(host.parse().unwrap()).await.unwrap();
    match tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(stream)).await {
        Ok((ws, _)) => (101, Some(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (resp.status().as_u16(), None),
        Err(_) => (0, None),
    }
}

/// `roomcast_connections_refused_total` for one reason, over the shards.
async fn refused(p: &Publisher, reason: &str) -> f64 {
    let (_, text) = p.get("/metrics").await;
    text.lines()
        .filter(|l| l.starts_with("roomcast_connections_refused_total{") && l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One address may hold `limits.per_ip_connections` connections: the next gets 429 before its
/// request is read, other addresses are not affected, and a closed connection frees its place.
/// Counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_connection_cap() {
    let cfg = config("trust-ipcap", "[limits]\nper_ip_connections = 3\nper_ip_connect_rate = 0\nip_exempt = []\n");
    let edge = EdgeProc::start(&["--shards", "2", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    let url = edge.url("?room=r");
    let mut held = Vec::new();
    for _ in 0..3 {
        let (st, ws) = status_from("127.0.0.5", &url).await;
        assert_eq!(st, 101);
        held.push(ws.unwrap());
    }
    for _ in 0..3 {
        let (st, _) = status_from("127.0.0.5", &url).await;
        assert_ne!(st, 101, "a fourth connection from one address is refused");
        assert!(st == 429 || st == 0, "429 or closed, got {st}");
    }
    assert_eq!(status_from("127.0.0.6", &url).await.0, 101, "another address has its own count");
    assert!(refused(&p, "ip_connections").await >= 3.0);
    // Closing one frees its place (the edge sees the close, then counts it out).
    let mut ws = held.pop().unwrap();
    ws.close(None).await.unwrap();
    let freed = wait_until(Duration::from_secs(10), || async { status_from("127.0.0.5", &url).await.0 == 101 }).await;
    assert!(freed, "a closed connection frees its address's place");
}

/// One address may open `per_ip_connect_burst` connections at once and then
/// `per_ip_connect_rate` a second: a reconnect storm from one host is refused (429) and
/// counted; the default exemption lets loopback (a local TLS terminator) through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_connect_rate_and_loopback_exemption() {
    let cfg = config(
        "trust-iprate",
        "[limits]\nper_ip_connections = 0\nper_ip_connect_rate = 0.2\nper_ip_connect_burst = 4\nip_exempt = [\"127.0.0.9/32\"]\n",
    );
    let edge = EdgeProc::start(&["--shards", "2", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    let url = edge.url("?room=r");
    let mut ok = 0;
    let mut refusals = 0;
    for _ in 0..10 {
        match status_from("127.0.0.7", &url).await.0 {
            101 => ok += 1,
            429 | 0 => refusals += 1,
            st => panic!("unexpected status {st}"),
        }
    }
    assert_eq!(ok, 4, "the burst, then refusals");
    assert_eq!(refusals, 6);
    assert_eq!(refused(&p, "ip_connect_rate").await, 6.0);
    // An exempt address is not limited.
    for _ in 0..10 {
        assert_eq!(status_from("127.0.0.9", &url).await.0, 101);
    }
    // Connections that were refused do not count against the open cap either (it is off
    // here); and an address that waited gets a token back (0.2/s: within 6 s).
    let back = wait_until(Duration::from_secs(8), || async { status_from("127.0.0.7", &url).await.0 == 101 }).await;
    assert!(back, "the bucket refills");
}

/// The socket path validates a publish as the publish API does: a body over
/// `ingest.max_body_bytes` is refused (`too_large`) and reaches nobody, though the frame fits
/// in `ws.max_message`; the same body over HTTP gets 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_publishes_are_bounded_like_the_publish_api() {
    let cfg = config("trust-parity", "[ws]\nmax_message = 65536\n[ingest]\nmax_body_bytes = 1024\n");
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "0", "--config", &cfg]);
    let publisher = Publisher::new(edge.http);
    let mut watcher = connect(&edge.url("?room=lobby"), None).await;
    expect_joined(&mut watcher, "lobby").await;
    let mut ws = connect(&edge.url("?room=lobby"), None).await;
    expect_joined(&mut ws, "lobby").await;
    let big = "x".repeat(4000);
    send_json(&mut ws, json!({"op":"publish","kind":"chat","body":big})).await;
    match answer(&mut ws).await {
        ServerMsg::Error { code, .. } => assert_eq!(code, "too_large"),
        other => panic!("an oversized body was accepted: {other:?}"),
    }
    let (st, _) = publisher
        .post_raw("/v1/rooms/lobby/messages", serde_json::to_vec(&json!({"kind":"chat","body":big})).unwrap())
        .await;
    assert_eq!(st, 413, "the publish API's answer to the same body");
    send_json(&mut ws, json!({"op":"publish","kind":"chat","body":"small"})).await;
    assert!(matches!(answer(&mut ws).await, ServerMsg::Published { .. }));
    let got = next_batch(&mut watcher).await;
    assert_eq!(got.len(), 1, "only the small chat is delivered: {got:?}");
    assert_eq!(got[0].2, "\"small\"");
}

/// Chat history serves only the last-`join_last` replay, so by default none is kept (a client
/// could fill every room it made with 64 KiB chats); with a replay it is bounded in bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_history_is_bounded_by_what_it_serves() {
    let history = |p: &Publisher, room: &'static str| {
        let p = p.clone();
        async move {
            let (_, text) = p.get(&format!("/v1/rooms/{room}")).await;
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["history_droppable"].as_u64().unwrap()
        }
    };
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0"]);
    let p = Publisher::new(edge.http);
    for n in 0..5 {
        p.publish("c", "chat", json!({ "n": n, "pad": "x".repeat(1500) })).await;
    }
    assert_eq!(history(&p, "c").await, 0, "join_last = 0: nothing to replay, nothing kept");

    let cfg = config("chat-history", "[history]\njoin_last = 3\ndroppable_bytes = 4000\n");
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    for n in 0..5 {
        p.publish("c", "chat", json!({ "n": n, "pad": "x".repeat(1500) })).await;
    }
    assert_eq!(history(&p, "c").await, 2, "4,000 bytes hold two 1.5 KB chats");
    for n in 0..5 {
        p.publish("d", "chat", json!(n)).await;
    }
    assert_eq!(history(&p, "d").await, 3, "no more than join_last");
}

/// A body nested deeper than 32 levels is refused on both paths (it broke common JSON parsers
/// in every member's client, and the gifts batched beside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_bodies_are_refused_on_both_paths() {
    let edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0"]);
    let p = Publisher::new(edge.http);
    let deep = "[".repeat(3000) + &"]".repeat(3000);
    let body = format!(r#"{{"kind":"chat","body":{deep}}}"#).into_bytes();
    let (st, v) = p.post_raw("/v1/rooms/n/messages", body).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("nested"), "{v}");
    let mut ws = connect(&edge.url("?room=n"), None).await;
    expect_joined(&mut ws, "n").await;
    let frame = format!(r#"{{"op":"publish","kind":"chat","body":{deep}}}"#);
    futures_util::SinkExt::send(&mut ws, Message::text(frame)).await.unwrap();
    assert!(matches!(answer(&mut ws).await, ServerMsg::Error { code, .. } if code == "bad_body"));
    let shallow = "[".repeat(32) + &"]".repeat(32);
    send_json(
        &mut ws,
        json!({"op":"publish","kind":"chat","body": serde_json::from_str::<serde_json::Value>(&shallow).unwrap()}),
    )
    .await;
    assert!(matches!(answer(&mut ws).await, ServerMsg::Published { .. }));
}

/// A password in the bus URL never reaches the log, nor the error when Redis cannot be
/// reached at start-up.
#[test]
fn the_bus_password_is_not_logged() {
    let dir = data_dir("buspw");
    // Nothing listens on port 1: the edge says it cannot reach Redis and exits.
    let out = std::process::Command::new(edge_bin())
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "1", "--data-dir"])
        .arg(&dir)
        .args(["--bus", "redis://:BUS-PW-SECRET-777@127.0.0.1:1"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(log.contains("redis"), "{log}");
    assert!(!log.contains("BUS-PW-SECRET-777"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `--check-config` reads the token key files as start-up does: a missing one, or a private
/// key where a public one belongs, is reported (exit 2, naming the key) instead of "ok".
#[test]
fn check_config_reads_the_key_files() {
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
    for (file, why) in
        [("/nonexistent/key.pem", "cannot read"), (keys.join("es256-a.key.pem").to_str().unwrap(), "not a")]
    {
        let cfg = config("checkkeys", &format!("[auth]\nkeys = [{{ alg = \"ES256\", file = \"{file}\" }}]\n"));
        let out = std::process::Command::new(edge_bin()).args(["--check-config", "--config", &cfg]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains("auth.keys[0].file") && err.contains(why), "{err}");
    }
}
