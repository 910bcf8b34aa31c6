//! The kernel probes inside a running edge: /metrics and /healthz follow the sockets, the
//! health policy moves with Send-Q, an overloaded edge refuses handshakes and leaves dispatch,
//! recovers, and (when configured) drains itself. Both probe sources.

use std::process::Command;
use std::time::Duration;

use roomcast_testsupport::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

async fn healthz(p: &Publisher) -> (u16, Value) {
    let (code, text) = p.get("/healthz").await;
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// What a new WebSocket client gets: Ok(()) when upgraded, Err(status) when refused.
async fn handshake(url: &str) -> Result<(), u16> {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => Ok(()),
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("handshake failed otherwise: {e}"),
    }
}

/// Slow readers: Send-Q thresholds low, the edge's own slow-consumer cut-off out of the way.
const SLOW_CONFIG: &str = "[probes]\ninterval_ms = 100\n\
    [health]\nsend_queue_p99_degraded_bytes = 4096\nsend_queue_p99_overloaded_bytes = 12288\nsend_queue_min_sockets = 1\nrecover_after = 2\n\
    [send]\nmax_queue_bytes = 67108864\nmax_queue_delay_ms = 8000\n";

async fn publish_until_overloaded(p: &Publisher, room: &str) -> Value {
    let pad = "x".repeat(8000);
    for n in 0..4000 {
        p.publish(room, "gift", json!({ "n": n, "pad": pad })).await;
        if n % 10 == 9 {
            let (code, h) = healthz(p).await;
            if code == 503 {
                return h;
            }
        }
    }
    panic!("never overloaded: {:?}", healthz(p).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_queue_overload_refuses_new_clients_then_recovers() {
    let cfg = config("health-sendq", SLOW_CONFIG);
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "0", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    assert!(
        wait_until(Duration::from_secs(10), || async { healthz(&p).await.1["probes"] == "ebpf" }).await,
        "eBPF probes in use: {:?}",
        healthz(&p).await
    );
    let (code, h) = healthz(&p).await;
    assert_eq!((code, h["status"].as_str()), (200, Some("ok")), "{h}");
    assert_eq!(handshake(&edge.url("?room=s")).await, Ok(()));

    let slow: Vec<_> = futures_util::future::join_all((0..4).map(|_| never_reader(edge.ws, "s"))).await;
    let h = publish_until_overloaded(&p, "s").await;
    assert_eq!(h["status"], "overloaded", "{h}");
    let reasons = h["reasons"].to_string();
    assert!(reasons.contains("send_queue_p99_bytes"), "{reasons}");
    assert_eq!(handshake(&edge.url("?room=s")).await, Err(503), "overloaded: handshakes refused");
    let (route_code, route) = p.get("/v1/route?room=s").await;
    assert_eq!(route_code, 503, "{route}");
    assert!(route.contains("overloaded"), "{route}");
    assert_eq!(metric(&p, "roomcast_health").await, 1.0);
    let (_, text) = p.get("/metrics").await;
    assert!(text.contains("roomcast_health{state=\"overloaded\"} 1"), "{text}");
    assert!(metric(&p, "roomcast_tcp_send_queue_max_bytes").await >= 12288.0);

    // The slow readers go: their sockets close, Send-Q empties, and after `recover_after`
    // looks the edge is ok again.
    drop(slow);
    assert!(
        wait_until(Duration::from_secs(20), || async { healthz(&p).await.0 == 200 }).await,
        "recovers: {:?}",
        healthz(&p).await
    );
    assert_eq!(healthz(&p).await.1["status"], "ok");
    assert_eq!(handshake(&edge.url("?room=s")).await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staying_overloaded_starts_a_drain_when_configured() {
    let text = SLOW_CONFIG.replace("recover_after = 2\n", "recover_after = 2\ndrain_after_overloaded_s = 1\n")
        + "[drain]\nperiod_ms = 200\ndeadline_ms = 1000\n";
    let cfg = config("health-drain", &text);
    let mut edge = EdgeProc::start(&["--shards", "1", "--merge-window-ms", "0", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    // The member sits in a quiet room, so its goaway is not queued behind megabytes of the
    // flooded room (the drain's 1 s deadline could close it before it read that far).
    let mut member = connect(&edge.url("?room=quiet"), None).await;
    expect_joined(&mut member, "quiet").await;
    let _slow: Vec<_> = futures_util::future::join_all((0..4).map(|_| never_reader(edge.ws, "d"))).await;
    publish_until_overloaded(&p, "d").await;
    // A second later the policy asks for a drain: the member is told to go, the edge exits.
    let mut told = false;
    while let Some(m) = next_msg_within(&mut member, Duration::from_secs(10)).await {
        if matches!(m, roomcast_proto::envelope::ServerMsg::Goaway { .. }) {
            told = true;
            break;
        }
    }
    assert!(told, "members get goaway");
    assert_eq!(edge.wait_exit(Duration::from_secs(15)), Some(0), "the edge drained and exited");
}

/// A draining edge's /healthz says `draining` (it said `degraded`, which reads as a problem to
/// look into): still 503, what load balancers act on, with the reason; /livez stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_draining_while_the_edge_drains() {
    let cfg = config("health-draining", "[drain]\nperiod_ms = 5000\ndeadline_ms = 10000\n");
    let mut edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    let (code, h) = healthz(&p).await;
    assert_eq!(code, 200, "{h}");
    assert_ne!(h["status"], "draining", "{h}");
    // A member keeps the drain going for its period.
    let mut member = connect(&edge.url("?room=d"), None).await;
    expect_joined(&mut member, "d").await;
    edge.sigterm();
    assert!(wait_until(Duration::from_secs(5), || async { healthz(&p).await.0 == 503 }).await, "503 while draining");
    let (_, h) = healthz(&p).await;
    assert_eq!((h["status"].as_str(), h["draining"].as_bool()), (Some("draining"), Some(true)), "{h}");
    assert!(h["reasons"].to_string().contains("draining"), "{h}");
    assert_eq!(p.get("/livez").await.0, 200);
}

/// The listening sockets on `port` as `ss` sees them: (accept queue, limit) summed.
fn ss_listen(port: u16) -> (u64, u64) {
    let out = Command::new("ss").args(["-tlnH", &format!("sport = :{port}")]).output().expect("ss");
    String::from_utf8_lossy(&out.stdout).lines().fold((0, 0), |(q, m), l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (q + f[1].parse::<u64>().unwrap(), m + f[2].parse::<u64>().unwrap())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sock_diag_source_exports_the_same_figures() {
    let cfg = config("health-sockdiag", "[probes]\nsource = \"sock_diag\"\ninterval_ms = 100\n");
    let edge = EdgeProc::start(&["--shards", "2", "--config", &cfg]);
    let p = Publisher::new(edge.http);
    assert!(wait_until(Duration::from_secs(10), || async { healthz(&p).await.1["probes"] == "sock_diag" }).await);
    let (_, text) = p.get("/metrics").await;
    assert!(text.contains("roomcast_probe_info{source=\"sock_diag\"} 1"), "{text}");
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&edge.url("?room=q"), None).await;
        expect_joined(&mut ws, "q").await;
        members.push(ws);
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            metric(&p, "roomcast_tcp_sockets").await == 5.0 // 3 connections + 2 listeners
        })
        .await,
        "sockets: {}",
        metric(&p, "roomcast_tcp_sockets").await
    );
    let (_, text) = p.get("/metrics").await;
    assert!(text.contains("roomcast_tcp_sockets{source=\"sock_diag\",state=\"established\"} 3"), "{text}");
    assert!(text.contains("roomcast_tcp_sockets{source=\"sock_diag\",state=\"listen\"} 2"), "{text}");
    let (queue, limit) = ss_listen(edge.ws.port());
    assert_eq!(metric(&p, "roomcast_listen_backlog").await, queue as f64);
    assert_eq!(metric(&p, "roomcast_listen_backlog_max").await, limit as f64);
    assert_eq!(limit, 2 * 4096, "two shards' listeners, ws.backlog 4096 each");
    // The eBPF-only families are absent rather than zero.
    assert!(!text.contains("roomcast_tcp_opened_total"));
    drop(members);
}

/// The policy on real kernel figures: a socket left in CLOSE_WAIT and a listener whose accept
/// queue is full, read through the eBPF probes, move the verdict as `[health]` says.
#[test]
fn the_policy_moves_on_real_close_wait_and_accept_queue_figures() {
    use std::net::{TcpListener, TcpStream};

    use edge::config::HealthConfig;
    use edge::dispatch::EdgeHealth;
    use edge::health::{Inputs, Rates, assess};
    use roomcast_ebpf::Probes;

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut probes = Probes::open_ebpf(&[port]).expect("eBPF probes load here");
    let cfg = HealthConfig {
        close_wait_degraded: 1,
        close_wait_overloaded: 2,
        accept_queue_degraded: 0.5,
        accept_queue_overloaded: 2.0,
        ..HealthConfig::default()
    };
    let look = |probes: &mut Probes| {
        let snap = probes.snapshot().unwrap();
        assess(&cfg, &Inputs::from_snapshot(&snap, &Rates::default()))
    };
    assert_eq!(look(&mut probes).0, EdgeHealth::Ok);

    // One peer goes away and the server side never closes: CLOSE_WAIT.
    let gone = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (half_closed, _) = l.accept().unwrap();
    drop(gone);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (level, reasons) = loop {
        let v = look(&mut probes);
        if v.0 != EdgeHealth::Ok || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(level, EdgeHealth::Degraded, "{reasons:?}");
    assert!(reasons[0].starts_with("close_wait 1 >= 1"), "{reasons:?}");

    // Connections the listener never accepts: the default backlog is far from full, so fill
    // a second, small listener on another port instead and watch both.
    let small = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    small.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    small.listen(2).unwrap();
    let small_port = small.local_addr().unwrap().as_socket().unwrap().port();
    let mut both = Probes::open_ebpf(&[port, small_port]).unwrap();
    let queued: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(("127.0.0.1", small_port)).unwrap()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (level, reasons) = loop {
        let v = look(&mut both);
        if v.1.iter().any(|r| r.starts_with("accept_queue_fill 1.00")) || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(level, EdgeHealth::Degraded, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("accept_queue_fill 1.00 >= 0.5")), "{reasons:?}");
    drop((half_closed, queued, small));
}
