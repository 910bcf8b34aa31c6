//! Dispatch as a client meets it: the URLs in `/v1/route` answers and in `goaway` are usable as
//! they are (room included), browsers on other origins may read the route answer (CORS), and an
//! edge whose advertised address nobody else could use says so, or refuses with a shared bus.

use std::process::Command;
use std::time::Duration;

use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;

async fn get(url: &str, origin: Option<&str>) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(o) = origin {
        req = req.header("Origin", o);
    }
    let r = req.send().await.expect("request");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap_or_default())
}

fn acao(h: &reqwest::header::HeaderMap) -> Option<&str> {
    h.get("access-control-allow-origin").and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_url_leads_back_to_the_same_room() {
    let mut edge = EdgeProc::start(&["--shards", "1", "--drain-period-ms", "300"]);
    let mut ws = connect(&edge.url("?room=stage.1"), None).await;
    expect_joined(&mut ws, "stage.1").await;
    // The route answer for a room is a WebSocket URL that joins it as is.
    let (status, _, body) = get(&format!("http://{}/v1/route?room=stage.1", edge.http), None).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let url = v["url"].as_str().unwrap().to_owned();
    assert_eq!(url, format!("ws://{}/ws?room=stage.1", edge.ws));
    let mut other = connect(&url, None).await;
    expect_joined(&mut other, "stage.1").await;
    drop(other);
    // A query that does not read gets the API's JSON error (it was plain text).
    let (status, _, body) = get(&format!("http://{}/v1/route?room=a&room=b", edge.http), None).await;
    assert_eq!(status, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    assert!(v["error"].as_str().is_some_and(|e| e.contains("duplicate field")), "{body}");

    edge.sigterm();
    let mut goaway = None;
    while let Some(m) = next_msg_within(&mut ws, Duration::from_secs(5)).await {
        if let ServerMsg::Goaway { url, .. } = m {
            goaway = Some(url);
            break;
        }
    }
    let goaway = goaway.expect("a goaway while draining");
    // This edge's own dispatch endpoint on the address clients reach, with the room.
    assert_eq!(goaway, format!("http://{}/v1/route?room=stage.1", edge.http));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_dispatch_url_and_a_bare_advertise_url_are_completed() {
    let dispatch = "https://dispatch.example/v1/route?region=eu";
    let edge = EdgeProc::start(&["--shards", "1", "--advertise", "ws://live.example:9000", "--dispatch-url", dispatch]);
    let (status, _, body) = get(&format!("http://{}/v1/route?room=r", edge.http), None).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["url"], "ws://live.example:9000/ws?room=r", "a bare ws://host:port gets the /ws path");
    let mut edge = edge;
    let mut ws = connect(&edge.url("?room=r"), None).await;
    expect_joined(&mut ws, "r").await;
    edge.sigterm();
    let mut goaway = None;
    while let Some(m) = next_msg_within(&mut ws, Duration::from_secs(15)).await {
        if let ServerMsg::Goaway { url, .. } = m {
            goaway = Some(url);
            break;
        }
    }
    assert_eq!(goaway.as_deref(), Some("https://dispatch.example/v1/route?region=eu&room=r"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_answer_is_readable_by_allowed_browser_origins() {
    // No allow-list: any page may read it (as any may open a socket).
    let open = EdgeProc::start(&["--shards", "1"]);
    let route = format!("http://{}/v1/route?room=a", open.http);
    let (status, h, _) = get(&route, Some("https://app.example")).await;
    assert_eq!((status, acao(&h)), (200, Some("*")));

    let cfg =
        config("dispatch-cors", "[ws]\nallowed_origins = [\"https://app.example\", \"https://*.fans.example\"]\n");
    let edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let route = format!("http://{}/v1/route?room=a", edge.http);
    for allowed in ["https://app.example", "https://eu.fans.example"] {
        let (status, h, body) = get(&route, Some(allowed)).await;
        assert_eq!((status, acao(&h)), (200, Some(allowed)), "{body}");
        assert!(h.get_all("vary").iter().any(|v| v.to_str().unwrap_or("").contains("Origin")));
    }
    let (status, h, _) = get(&route, Some("https://evil.example")).await;
    assert_eq!((status, acao(&h)), (200, None), "another origin's page cannot read the answer");
    // The preflight a browser sends when the app adds a header of its own.
    let r = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, &route)
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(acao(r.headers()), Some("https://app.example"));
    assert!(r.headers().get("access-control-allow-methods").is_some_and(|v| v == "GET"));
}

#[test]
fn an_unusable_advertised_address_is_refused_with_a_shared_bus_and_warned_about_alone() {
    // Every interface, a shared bus, no --advertise: dispatch would hand out ws://127.0.0.1.
    // The refusal comes before any connection to Redis (the URL below has no server).
    let out = Command::new(edge_bin())
        .args(["--listen", "0.0.0.0:0", "--http", "127.0.0.1:0", "--bus", "redis://127.0.0.1:1", "--no-store"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("advertise") && err.contains("0.0.0.0"), "{err}");

    // Alone, the edge starts and says what dispatch and goaway will hand out.
    let data = data_dir("dispatch-warn");
    let mut child = Command::new(edge_bin())
        .args(["--listen", "0.0.0.0:0", "--http", "0.0.0.0:0", "--shards", "1", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        // A publish API on every interface needs keys.
        .env("ROOMCAST_API_KEYS", "test:0123456789abcdef0123456789abcdef")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    if !line.starts_with("roomcast edge ready") {
        let out = child.wait_with_output().unwrap();
        panic!("did not start: {line} {}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&data);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no advertise URL"), "{err}");
    assert!(err.contains("loopback dispatch URL"), "{err}");
}

/// Dispatch weighs bandwidth, not only connections: an edge writing more bytes a second than
/// its `dispatch.egress_bytes_per_s` is fuller than one holding more (idle) connections, so
/// new clients go to the other one (by power of two choices: whenever it is drawn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_near_its_link_limit_gets_fewer_new_clients_than_connections_alone_would_give_it() {
    let redis = RedisProc::start();
    let bus = redis.url();
    let cfg = config("dispatch-egress", "[dispatch]\negress_bytes_per_s = 2000\n");
    let busy = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "10", "--bus", &bus, "--config", &cfg]);
    let idle = EdgeProc::start(&["--shards", "1", "--bus", &bus]);
    // The busy edge holds one member, the idle one three: by connections alone, the busy one
    // is the lighter.
    let mut member = connect(&busy.url("?room=hot"), None).await;
    expect_joined(&mut member, "hot").await;
    let mut others = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&idle.url("?room=quiet"), None).await;
        expect_joined(&mut ws, "quiet").await;
        others.push(ws);
    }
    // About 10 KB a second to the busy edge's member, five times its link, for the test's length.
    let p = Publisher::new(busy.http);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pumping = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                p.publish("hot", "chat", serde_json::json!("x".repeat(500))).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let reader =
        tokio::spawn(async move { while next_msg_within(&mut member, Duration::from_secs(5)).await.is_some() {} });
    // Two reports (one a second) so that the busy edge's bytes/s covers a whole second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (mut to_busy, mut to_idle) = (0, 0);
    for _ in 0..100 {
        let (status, _, body) = get(&format!("http://{}/v1/route?room=new", idle.http), None).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let url = v["url"].as_str().unwrap();
        if url.contains(&busy.ws.to_string()) {
            to_busy += 1;
        } else if url.contains(&idle.ws.to_string()) {
            to_idle += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = pumping.await;
    reader.abort();
    // Two edges, two draws: the lighter one wins unless both draws are the other (1 in 4).
    assert_eq!(to_busy + to_idle, 100);
    assert!(to_idle >= 55, "the edge past its link limit should lose most draws: {to_busy} busy, {to_idle} idle");
}

/// Calls of one command Redis has served so far (`INFO commandstats`).
fn redis_calls(port: u16, command: &str) -> u64 {
    let info = redis_cli(port, &["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A storm of reconnecting clients asks dispatch most when everything else is busy too: the load
/// reports are read from Redis at most once per `registry::CACHE_MS` (200 ms), however many ask
/// at once, not twice per request (a range query and an MGET each, before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_reads_the_load_reports_once_per_period_however_many_clients_ask() {
    let redis = RedisProc::start();
    let bus = redis.url();
    let a = EdgeProc::start(&["--shards", "1", "--bus", &bus]);
    let b = EdgeProc::start(&["--shards", "1", "--bus", &bus]);
    let url = format!("http://{}/v1/route?room=storm", a.http);
    // Both edges reported.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..20 {
                let (_, _, body) = get(&url, None).await;
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                seen.insert(v["edge"].as_str().map(str::to_owned));
            }
            seen.len() == 2
        })
        .await,
        "dispatch answers with both edges"
    );
    let before = redis_calls(redis.port, "mget");
    let started = std::time::Instant::now();
    let client = reqwest::Client::new();
    let mut answered = 0;
    for _ in 0..10 {
        let asks: Vec<_> = (0..50).map(|_| tokio::spawn(client.get(&url).send())).collect();
        for ask in asks {
            let r = ask.await.expect("task").expect("route request");
            assert_eq!(r.status().as_u16(), 200);
            answered += 1;
        }
    }
    let periods = started.elapsed().as_millis() as u64 / 200 + 1;
    let reads = redis_calls(redis.port, "mget") - before;
    assert_eq!(answered, 500);
    // At most one read per period begun while the requests ran (and one begun just before).
    assert!(reads <= periods + 1, "{reads} report reads for {answered} requests in {periods} periods of 200 ms");
    drop(b);
}

/// Dispatch answers from a read of the reports up to 200 ms old, so a draining edge waits that
/// long after its `draining` report is written before it answers the drain request: from then
/// on no dispatch answer names it, however busy dispatch was (a cache kept warm by clients
/// asking every few milliseconds, as in a storm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_names_a_draining_edge_once_its_drain_is_accepted() {
    const TOKEN: &str = "test-admin-token-0123456789";
    let redis = RedisProc::start();
    let bus = redis.url();
    let cfg = config("dispatch-drain", &format!("admin_token = \"{TOKEN}\"\n[drain]\nperiod_ms = 2000\n"));
    let drained = EdgeProc::start(&["--shards", "1", "--bus", &bus, "--config", &cfg]);
    let other = EdgeProc::start(&["--shards", "1", "--bus", &bus]);
    let url = format!("http://{}/v1/route?room=r", other.http);
    let drained_ws = drained.ws.to_string();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let mut named = false;
            for _ in 0..20 {
                named |= get(&url, None).await.2.contains(&drained_ws);
            }
            named
        })
        .await,
        "dispatch answers with the edge to drain"
    );
    // Ask continuously, noting when the requests answered with the drained edge were sent.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asker = {
        let (stop, url, drained_ws) = (stop.clone(), url.clone(), drained_ws.clone());
        tokio::spawn(async move {
            let mut named_at = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = std::time::Instant::now();
                let (_, _, body) = get(&url, None).await;
                if body.contains(&drained_ws) {
                    named_at.push(asked);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            named_at
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/admin/drain", drained.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let accepted = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let named_at = asker.await.unwrap();
    assert!(!named_at.is_empty(), "the asker saw the drained edge before its drain");
    let late = named_at.iter().filter(|t| **t > accepted).count();
    assert_eq!(late, 0, "{late} requests sent after the drain was accepted were answered with the draining edge");
}

/// Dispatch's refusals say why, and `edge dispatch` counts its answers by outcome on /metrics:
/// 10^6 rolling restarts saw 29, 4,262 and 26,223 refused routes for one command, with nothing
/// but a bare "no healthy edge available" to tell them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_says_why_it_refused_and_counts_its_answers() {
    const TOKEN: &str = "test-admin-token-0123456789";
    let redis = RedisProc::start();
    /// Killed when the test ends, failed or not.
    struct Dispatch(std::process::Child);
    impl Drop for Dispatch {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Dispatch(
        std::process::Command::new(edge_bin())
            .args(["dispatch", "--redis", &redis.url(), "--http", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("edge dispatch"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.0.stdout.take().unwrap()), &mut line).unwrap();
    let http = line.split_whitespace().find_map(|w| w.strip_prefix("http=")).expect("http=").to_owned();
    let url = format!("http://{http}/v1/route?room=r");
    let (status, _, body) = get(&url, None).await;
    assert_eq!((status, body.contains("no edge has reported")), (503, true), "{body}");
    let cfg = config("dispatch-why", &format!("admin_token = \"{TOKEN}\"\n[drain]\nperiod_ms = 500\n"));
    let edge = EdgeProc::start(&["--shards", "1", "--bus", &redis.url(), "--config", &cfg]);
    assert!(wait_until(Duration::from_secs(10), || async { get(&url, None).await.0 == 200 }).await, "routed");
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/admin/drain", edge.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // The reports are read at most every 200 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, body) = get(&url, None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no healthy edge available: ") && body.contains(": draining"), "{body}");
    let (_, _, metrics) = get(&format!("http://{http}/metrics"), None).await;
    let count = |outcome: &str| {
        let prefix = format!("roomcast_dispatch_answers_total{{outcome=\"{outcome}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|n| n.parse::<u64>().ok())
    };
    assert!(count("no_edge_reported").is_some_and(|n| n >= 1), "{metrics}");
    assert!(count("routed").is_some_and(|n| n >= 1), "{metrics}");
    assert_eq!(count("none_eligible"), Some(1), "{metrics}");
    assert_eq!(count("reports_unavailable"), Some(0), "{metrics}");
}
