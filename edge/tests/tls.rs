//! wss: the edge serving TLS itself (issue #18). Real edge processes with a CA and server
//! certificates made at test time (rcgen); rustls clients (tokio-tungstenite) that trust that
//! CA only.
//!
//! - every gift of a published sequence arrives over wss, and dispatch hands out wss:// URLs;
//! - a plain ws:// client on the TLS port is answered 400 and closed; garbage and a stalled
//!   handshake are closed too; each counted (`tls_error`, `handshake_timeout`), no panic;
//! - SIGHUP reloads the certificate: connections under way keep going, new ones see the new
//!   certificate; a bad file keeps the old one;
//! - the kTLS probe's answer is in the log (this kernel has none: the kTLS path is skipped);
//! - an expired certificate: the edge starts, warns naming the file and the date, exports a
//!   negative `roomcast_tls_cert_expiry_seconds` and is `degraded`; SIGHUP to a fresh one moves
//!   the gauge positive and clears the reason.

use std::time::Duration;

use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `roomcast_connections_closed_total` for one reason, summed over shards.
async fn closed(p: &Publisher, reason: &str) -> f64 {
    let (_, text) = p.get("/metrics").await;
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("roomcast_connections_closed_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wss_url(edge: &EdgeProc, query: &str) -> String {
    format!("wss://127.0.0.1:{}/ws{query}", edge.ws.port())
}

/// Reads gifts until `n` distinct ones arrived (or the deadline); returns their `n` values.
async fn gifts(ws: &mut Ws, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        match next_msg_within(ws, Duration::from_secs(20)).await {
            Some(ServerMsg::Batch { messages, .. }) => {
                got.extend(
                    messages
                        .iter()
                        .filter_map(|m| serde_json::from_str::<serde_json::Value>(&m.body).ok()?["n"].as_u64()),
                );
            }
            Some(_) => {}
            None => break,
        }
    }
    got
}

fn start_tls_edge(pki: &TestPki, extra: &[&str]) -> EdgeProc {
    let (cert, key) = (pki.cert_path(), pki.key_path());
    let mut args = vec!["--shards", "2", "--tls-cert", &cert, "--tls-key", &key];
    args.extend_from_slice(extra);
    EdgeProc::start(&args)
}

#[tokio::test]
async fn every_gift_arrives_over_wss_and_dispatch_hands_out_wss() {
    let pki = TestPki::new("gifts");
    let leaf = pki.issue(1, "edge-1", KeyAlg::EcdsaP256);
    let edge = start_tls_edge(&pki, &[]);
    let p = Publisher::new(edge.http);

    // Dispatch (this edge's own /v1/route) hands out wss://.
    let (status, body) = p.get("/v1/route?room=tls").await;
    assert_eq!(status, 200, "{body}");
    let route: serde_json::Value = serde_json::from_str(&body).unwrap();
    let url = route["url"].as_str().unwrap();
    assert!(url.starts_with("wss://"), "dispatch answered {url}");

    let mut ws = pki.connect(&wss_url(&edge, "?room=tls"), None).await;
    assert_eq!(peer_leaf(&ws).as_ref(), Some(&leaf.der), "the edge presents the configured certificate");
    expect_joined(&mut ws, "tls").await;
    // rkyv over wss too (binary frames), in the same room.
    let mut bin = pki.connect(&wss_url(&edge, "?room=tls"), Some("roomcast.rkyv.v2")).await;
    expect_joined(&mut bin, "tls").await;

    const N: u64 = 300;
    for n in 1..=N {
        publish_gift(&p, "tls", n).await;
    }
    for (name, ws) in [("json", &mut ws), ("rkyv", &mut bin)] {
        let got = gifts(ws, N as usize).await;
        assert_eq!(got, (1..=N).collect::<Vec<_>>(), "{name}: every gift, in order, once");
    }
    // A big message (several TLS records per frame) arrives whole.
    let big = "x".repeat(60_000);
    p.publish("tls", "gift", serde_json::json!({ "n": N + 1, "pad": big })).await;
    assert_eq!(gifts(&mut ws, 1).await, vec![N + 1]);
    assert_eq!(metric(&p, "roomcast_connections_closed_total").await, 0.0, "nothing closed");

    // The SSE fallback is on the same listener: an https:// event stream.
    let mut sse = pki.https_get(edge.ws, "/sse?room=tls", "Accept: text/event-stream\r\n").await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut published = false;
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("\"n\":999") {
        let n = tokio::time::timeout_at(end, sse.read(&mut buf)).await.expect("the gift over https SSE").unwrap();
        assert!(n > 0, "stream ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        // Published once the stream is answered (it joined).
        if !published && seen.windows(4).any(|w| w == b"\r\n\r\n") {
            published = true;
            publish_gift(&p, "tls", 999).await;
        }
    }
    assert!(seen.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
}

#[tokio::test]
async fn bad_input_on_the_tls_port_is_closed_and_counted() {
    let pki = TestPki::new("bad-input");
    pki.issue(1, "edge-1", KeyAlg::EcdsaP256);
    let cfg = config("tls-bad-input", "[ws]\nhandshake_timeout_ms = 1000\n");
    let edge = start_tls_edge(&pki, &["--config", &cfg]);
    let p = Publisher::new(edge.http);

    // A plain ws:// client: answered in its own language (400) and closed.
    let mut raw = tokio::net::TcpStream::connect(edge.ws).await.unwrap();
    raw.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer)).await.expect("closed").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("wss://"), "{answer}");
    // tokio-tungstenite speaking ws:// to it gets the same refusal, as an error, not a hang.
    let e = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(edge.url("")))
        .await
        .expect("answered");
    assert!(e.is_err(), "a ws:// handshake on the TLS port must fail");
    assert!(
        wait_until(Duration::from_secs(10), || async { closed(&p, "tls_error").await >= 2.0 }).await,
        "both counted as tls_error"
    );

    // Garbage bytes: closed (with an alert), counted, no panic.
    for garbage in [&b"\x16\x03\x01\x00\x05hello-garbage"[..], &[0xffu8; 64][..], b"\x16\x03\x03\xff\xff"] {
        let mut raw = tokio::net::TcpStream::connect(edge.ws).await.unwrap();
        raw.write_all(garbage).await.unwrap();
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "closed, not left open: {garbage:?}");
    }
    assert!(
        wait_until(Duration::from_secs(10), || async { closed(&p, "tls_error").await >= 5.0 }).await,
        "each garbage input counted as tls_error: {}",
        closed(&p, "tls_error").await
    );

    // A client that connects and never says hello: the handshake timeout.
    let mut raw = tokio::net::TcpStream::connect(edge.ws).await.unwrap();
    let mut sink = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink)).await;
    assert!(r.is_ok(), "a silent client is closed by the handshake timeout");
    assert!(
        wait_until(Duration::from_secs(10), || async { closed(&p, "handshake_timeout").await >= 1.0 }).await,
        "counted as handshake_timeout"
    );

    // A client that trusts another CA fails its handshake (it sends the alert).
    let other = TestPki::new("bad-input-other");
    assert!(other.try_connect(&wss_url(&edge, ""), None).await.is_err(), "an untrusted certificate is refused");
    assert!(
        wait_until(Duration::from_secs(10), || async { closed(&p, "tls_error").await >= 6.0 }).await,
        "the client's alert closes its connection, counted as tls_error"
    );

    // And the edge still serves.
    let mut ws = pki.connect(&wss_url(&edge, "?room=ok"), None).await;
    expect_joined(&mut ws, "ok").await;
    publish_gift(&p, "ok", 7).await;
    assert_eq!(gifts(&mut ws, 1).await, vec![7]);
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_keeps_connections() {
    let pki = TestPki::new("reload");
    let first = pki.issue(1, "edge-gen-1", KeyAlg::EcdsaP256);
    let cert = pki.cert_path();
    let key = pki.key_path();
    let data = data_dir("tls-reload");
    let (edge, log) = EdgeProc::start_on(&data, &["--shards", "2", "--tls-cert", &cert, "--tls-key", &key], "info");
    let p = Publisher::new(edge.http);
    // The kTLS probe's answer is reported, whichever it is.
    let text = log.lock().unwrap().clone();
    if text.contains("kTLS unavailable") {
        eprintln!(
            "kTLS path skipped: this kernel has no kTLS (the probe's answer is in the log); the user-space path is tested"
        );
    } else {
        assert!(text.contains("kTLS available"), "the kTLS probe's answer is logged: {text}");
        eprintln!("kTLS is available here, but its data path is not built: the user-space path is tested");
    }

    let mut old = pki.connect(&wss_url(&edge, "?room=r"), None).await;
    assert_eq!(peer_leaf(&old).as_ref(), Some(&first.der));
    expect_joined(&mut old, "r").await;

    let hup = |pid: u32| {
        std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().expect("kill");
    };
    let second = pki.issue(2, "edge-gen-2", KeyAlg::Rsa2048);
    hup(edge.child.id());
    let fresh_sees = |want: rustls::pki_types::CertificateDer<'static>| {
        let (pki, url) = (&pki, wss_url(&edge, ""));
        async move {
            wait_until(Duration::from_secs(10), || {
                let (url, want) = (url.clone(), want.clone());
                async move {
                    match pki.try_connect(&url, None).await {
                        Ok(ws) => peer_leaf(&ws) == Some(want),
                        Err(_) => false,
                    }
                }
            })
            .await
        }
    };
    assert!(fresh_sees(second.der.clone()).await, "a new connection sees the new certificate");

    // A bad file: the old (second) certificate stays, and the log says why.
    std::fs::write(&cert, "not a certificate").unwrap();
    hup(edge.child.id());
    assert!(
        wait_until(Duration::from_secs(10), || async { log.lock().unwrap().contains("TLS reload failed") }).await,
        "the failed reload is logged"
    );
    let ws = pki.connect(&wss_url(&edge, ""), None).await;
    assert_eq!(peer_leaf(&ws), Some(second.der.clone()), "the old certificate stays in use");
    drop(ws);
    let third = pki.issue(3, "edge-gen-3", KeyAlg::EcdsaP256);
    hup(edge.child.id());
    assert!(fresh_sees(third.der.clone()).await, "the next good reload is taken");

    // The connection from before every reload still gets every gift.
    for n in 1..=50 {
        publish_gift(&p, "r", n).await;
    }
    assert_eq!(gifts(&mut old, 50).await, (1..=50).collect::<Vec<_>>());
    assert_eq!(closed(&p, "tls_error").await, 0.0);
    // Every reload counted by its outcome (two good, one failed), for a renewal hook to check.
    let (_, text) = p.get("/metrics").await;
    let reloads = |outcome: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("roomcast_tls_reloads_total{{outcome=\"{outcome}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!((reloads("ok"), reloads("failed")), (Some(2.0), Some(1.0)), "{text}");
    drop(edge);
    let _ = std::fs::remove_dir_all(data);
}

/// `roomcast_tls_cert_expiry_seconds` (None: not exported).
async fn cert_expiry(p: &Publisher) -> Option<f64> {
    let (_, text) = p.get("/metrics").await;
    text.lines()
        .find(|l| l.starts_with("roomcast_tls_cert_expiry_seconds{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

#[tokio::test]
async fn an_expired_certificate_is_warned_about_measured_and_cleared_by_sighup() {
    let pki = TestPki::new("expired");
    let old = pki.issue_dated(1, "edge-expired", KeyAlg::EcdsaP256, (2020, 1, 1), (2021, 1, 1));
    let (cert, key) = (pki.cert_path(), pki.key_path());
    let data = data_dir("tls-expired");
    // It starts (an operator may be mid-rotation) ...
    let (edge, log) = EdgeProc::start_on(&data, &["--shards", "1", "--tls-cert", &cert, "--tls-key", &key], "info");
    let p = Publisher::new(edge.http);
    // ... and says so, naming the file and the date.
    let text = log.lock().unwrap().clone();
    let warn = text
        .lines()
        .find(|l| l.contains("WARN") && l.contains(&format!("tls.cert: {cert} expired")))
        .unwrap_or_else(|| panic!("a WARN names the file and says expired: {text}"));
    assert!(warn.contains("2021"), "the WARN gives the date: {warn}");
    let left = cert_expiry(&p).await.expect("roomcast_tls_cert_expiry_seconds is exported");
    assert!(left < 0.0, "expired: the gauge is negative ({left})");
    // The server still presents it (clients that check dates refuse it: ours does).
    assert!(pki.try_connect(&wss_url(&edge, ""), None).await.is_err(), "a date-checking client refuses it");
    let (_, body) = p.get("/healthz").await;
    let h: serde_json::Value = serde_json::from_str(&body).expect("healthz json");
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["tls_cert"]["state"], "expired", "{h}");
    assert!(h["reasons"].to_string().contains("expired"), "{h}");
    drop(old);

    // A fresh certificate and SIGHUP: the gauge goes positive, the reason goes, clients connect.
    let fresh = pki.issue(2, "edge-fresh", KeyAlg::EcdsaP256);
    std::process::Command::new("kill").args(["-HUP", &edge.child.id().to_string()]).status().expect("kill");
    assert!(
        wait_until(Duration::from_secs(10), || async { cert_expiry(&p).await.is_some_and(|s| s > 0.0) }).await,
        "after SIGHUP to a fresh certificate the gauge is positive"
    );
    let ws = pki.connect(&wss_url(&edge, ""), None).await;
    assert_eq!(peer_leaf(&ws), Some(fresh.der.clone()));
    let (_, body) = p.get("/healthz").await;
    let h: serde_json::Value = serde_json::from_str(&body).expect("healthz json");
    assert_eq!(h["tls_cert"]["state"], "valid", "{h}");
    assert!(!h["reasons"].to_string().contains("tls.cert"), "{h}");
    drop(ws);
    drop(edge);
    let _ = std::fs::remove_dir_all(data);
}

#[tokio::test]
async fn the_rust_client_follows_dispatch_to_wss() {
    use roomcast_client::{Client, ConnectionState, Event};
    let pki = TestPki::new("rust-client");
    pki.issue(1, "edge-1", KeyAlg::EcdsaP256);
    let edge = start_tls_edge(&pki, &[]);
    let p = Publisher::new(edge.http);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let dispatch = format!("http://{}/v1/route", edge.http);

    // Without the test CA (the default web PKI roots) the wss handshake fails: reported.
    let (untrusting, mut ev) = Client::start(roomcast_client::Config::dispatch(dispatch.clone()).room("c")).unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(e) = ev.recv().await {
            if let Event::Error(e) = e {
                return Some(e.to_string());
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    assert!(failed.is_some(), "a client that does not trust the CA reports an error");
    untrusting.close().await;

    let cfg = roomcast_client::Config::dispatch(dispatch).room("c").tls_roots(roots);
    let (client, mut ev) = Client::start(cfg).unwrap();
    let mut url = None;
    let mut got = Vec::new();
    let mut published = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < 20 {
        let e = tokio::time::timeout_at(deadline, ev.recv()).await.expect("20 gifts in time").expect("events");
        match e {
            Event::State(ConnectionState::Connected { url: u, .. }) => url = Some(u),
            Event::Joined { .. } if !published => {
                published = true;
                for n in 1..=20 {
                    publish_gift(&p, "c", n).await;
                }
            }
            Event::Message(m) => got.push(m.seq),
            _ => {}
        }
    }
    let url = url.expect("connected");
    assert!(url.starts_with("wss://"), "dispatch sent the client to {url}");
    assert_eq!(got.len(), 20);
    client.close().await;
}

#[tokio::test]
async fn the_http_api_over_tls_and_goaway_name_https_dispatch() {
    let pki = TestPki::new("https-api");
    pki.issue(1, "edge-1", KeyAlg::EcdsaP256);
    let cfg = config("tls-https-api", "[drain]\nperiod_ms = 200\ndeadline_ms = 5000\n");
    let mut edge = start_tls_edge(&pki, &["--tls-http", "--config", &cfg]);

    // /v1/route over https answers a wss:// URL.
    let mut s = pki.https_get(edge.http, "/v1/route?room=g", "Connection: close\r\n").await;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut answer)).await.expect("answer").ok();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(&format!("\"url\":\"wss://127.0.0.1:{}/ws?room=g\"", edge.ws.port())), "{answer}");
    // Plain HTTP to it gets no answer: the listener speaks TLS only.
    let mut plain = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut got)).await;
    assert!(!got.starts_with(b"HTTP/1.1 200"), "plain HTTP answered on a TLS API port");

    // A drain's goaway sends the client to this edge's https dispatch URL.
    let mut ws = pki.connect(&wss_url(&edge, "?room=g"), None).await;
    expect_joined(&mut ws, "g").await;
    edge.sigterm();
    let goaway = loop {
        match next_msg_within(&mut ws, Duration::from_secs(10)).await {
            Some(ServerMsg::Goaway { url, .. }) => break url,
            Some(_) => {}
            None => panic!("no goaway"),
        }
    };
    assert_eq!(goaway, format!("https://127.0.0.1:{}/v1/route?room=g", edge.http.port()));
    assert_eq!(edge.wait_exit(Duration::from_secs(20)), Some(0));
}

#[tokio::test]
async fn stand_alone_dispatch_over_https_hands_out_the_edges_wss_url() {
    let pki = TestPki::new("dispatch");
    pki.issue(1, "edge-1", KeyAlg::EcdsaP256);
    let redis = RedisProc::start();
    let edge = start_tls_edge(&pki, &["--bus", &redis.url(), "--no-store"]);
    let mut child = std::process::Command::new(edge_bin())
        .args(["dispatch", "--redis", &redis.url(), "--http", "127.0.0.1:0"])
        .args(["--tls-cert", &pki.cert_path(), "--tls-key", &pki.key_path()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("edge dispatch");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let addr: std::net::SocketAddr =
        line.split_whitespace().find_map(|w| w.strip_prefix("http=")).expect("http=").parse().unwrap();
    let want = format!("\"url\":\"wss://127.0.0.1:{}/ws?room=d\"", edge.ws.port());
    // The edge's first load report reaches Redis within a second or so: poll.
    let ok = wait_until(Duration::from_secs(15), || async {
        let mut s = pki.https_get(addr, "/v1/route?room=d", "Connection: close\r\n").await;
        let mut answer = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await;
        answer.starts_with("HTTP/1.1 200") && answer.contains(&want)
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "dispatch over https never answered {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_member_that_never_reads_is_cut_off_while_another_keeps_up() {
    let pki = TestPki::new("slow");
    pki.issue(1, "edge-1", KeyAlg::EcdsaP256);
    let cfg = config("tls-slow", "[send]\nmax_queue_bytes = 262144\n[fanout]\nmax_batch_bytes = 16384\n");
    let edge = start_tls_edge(&pki, &["--merge-window-ms", "5", "--config", &cfg]);
    let p = Publisher::new(edge.http);

    // TLS handshake and upgrade, then never a read again (4 KiB receive buffer).
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&edge.ws.into()).unwrap();
    s.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(s.into()).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut slow = tokio_rustls::TlsConnector::from(pki.client_config()).connect(name, tcp).await.unwrap();
    slow.write_all(
        b"GET /ws?room=slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    slow.flush().await.unwrap();
    let mut fast = pki.connect(&wss_url(&edge, "?room=slow"), None).await;
    expect_joined(&mut fast, "slow").await;
    let reader = tokio::spawn(async move { gifts(&mut fast, 400).await });

    let big = "g".repeat(4000);
    let mut cut = false;
    for n in 0..400u64 {
        p.publish("slow", "gift", serde_json::json!({ "n": n, "pad": big })).await;
        if !cut && n % 20 == 19 {
            cut = metric(&p, "roomcast_slow_consumer_closes_total").await >= 1.0;
        }
    }
    assert!(
        cut || wait_until(Duration::from_secs(10), || async {
            metric(&p, "roomcast_slow_consumer_closes_total").await >= 1.0
        })
        .await,
        "the wss member that never reads is cut off (its queue is bounded like a plain one's)"
    );
    assert_eq!(reader.await.unwrap(), (0..400).collect::<Vec<_>>(), "the reading member gets every gift");
    // Closed once its close frame's flush times out (it never reads): counted then.
    assert!(
        wait_until(Duration::from_secs(10), || async { closed(&p, "slow_consumer").await >= 1.0 }).await,
        "counted as slow_consumer"
    );
    drop(slow);
}

#[tokio::test]
async fn the_rust_client_asks_https_dispatch_and_follows_it_to_wss() {
    use roomcast_client::{Client, ConnectionState, Event};
    let pki = TestPki::new("rust-client-https");
    pki.issue(1, "edge-1", KeyAlg::EcdsaP256);
    let edge = start_tls_edge(&pki, &["--tls-http"]);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let cfg = roomcast_client::Config::dispatch(format!("https://127.0.0.1:{}/v1/route", edge.http.port()))
        .room("h")
        .tls_roots(roots);
    let (client, mut ev) = Client::start(cfg).unwrap();
    let url = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(e) = ev.recv().await {
            match e {
                Event::State(ConnectionState::Connected { url, .. }) => return Ok(url),
                Event::Error(e) => return Err(e.to_string()),
                _ => {}
            }
        }
        Err("events ended".to_owned())
    })
    .await
    .expect("connected in time")
    .expect("no error");
    assert!(url.starts_with("wss://"), "{url}");
    client.close().await;
}
