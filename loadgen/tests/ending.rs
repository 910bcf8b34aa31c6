//! How a run ends: its members leave as clients do (a close frame, then the socket shut
//! cleanly), and an edge that stopped answering publishes does not hold the run past its
//! `--duration` for long.

use std::process::Command;
use std::time::{Duration, Instant};

use roomcast_testsupport::{EdgeProc, config};

/// Stops an edge as an operator's Ctrl-C would, and waits for it.
fn stop(e: &mut EdgeProc) {
    let _ = Command::new("kill").args(["-INT", &e.child.id().to_string()]).status();
    let _ = e.wait_exit(Duration::from_secs(30));
}

/// The one run's result.json under `out`.
fn result(out: &std::path::Path) -> serde_json::Value {
    let dir = std::fs::read_dir(out).unwrap().next().expect("results written").unwrap().path();
    serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap()
}

/// `roomcast_connections_closed_total` by reason, summed over shards.
fn closed_by_reason(http: std::net::SocketAddr) -> std::collections::BTreeMap<String, u64> {
    let text = reqwest::blocking::get(format!("http://{http}/metrics")).unwrap().text().unwrap();
    let mut by = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with("roomcast_connections_closed_total{")) {
        let Some(reason) = l.split("reason=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let n: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
        *by.entry(reason.to_owned()).or_default() += n as u64;
    }
    by
}

/// At a run's end every member leaves as a client does: a close frame with 1000, its write side
/// shut, then what the edge still sends read to the edge's own close. The edge counts each one
/// `peer_closed` and none `peer_reset`: the workers used to exit with the sockets open, and the
/// kernel reset those with unread bytes in them (pings, here every 250 ms: 53 of these 400 in a
/// trial, most of a 10^6 run's members). The results say how many the generator closed.
#[test]
fn members_close_with_a_close_frame_at_the_end() {
    end_of_run("ws", &[], &[], 400);
}

/// The same over TLS (the close frame, then TLS's close_notify) and for event-stream members
/// (no close frame: the socket shut), whose heartbeats do not hold the run's end.
#[test]
fn tls_and_event_stream_members_close_cleanly_at_the_end() {
    let pki = roomcast_testsupport::TestPki::new("loadgen-end-tls");
    pki.issue(1, "edge", roomcast_testsupport::KeyAlg::EcdsaP256);
    let ca = pki.dir.join("ca.pem");
    let (cert, key) = (pki.cert_path(), pki.key_path());
    end_of_run("tls", &["--tls-cert", &cert, "--tls-key", &key], &["--tls-ca", ca.to_str().unwrap()], 100);
    end_of_run("sse", &[], &["--sse"], 100);
}

/// Runs `members` members (2 workers, 2 s of gifts and chat) on an edge started with
/// `edge_args` and pinging every 100 ms, with `extra` flags; checks the edge counted every
/// member closed by its peer and none reset, and the results every one closed by the generator.
fn end_of_run(name: &str, edge_args: &[&str], extra: &[&str], members: u64) {
    let cfg = config(&format!("loadgen-end-{name}"), "[ws]\nping_interval_ms = 100\nidle_timeout_ms = 1000\n");
    let mut args = vec!["--shards", "2", "--config", &cfg];
    args.extend_from_slice(edge_args);
    let mut edge = EdgeProc::start(&args);
    let out = roomcast_testsupport::scratch().join(format!("loadgen-end-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let started = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &edge.ws.to_string(), "--http", &edge.http.to_string()])
        .args(["--connections", &members.to_string(), "--workers", "2", "--duration", "2", "--gift-rate", "5"])
        .args(["--chat-rate", "20", "--scenario", name, "--out", out.to_str().unwrap()])
        .args(extra)
        .output()
        .expect("loadgen");
    assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    // Generous: the end waits for the stream to go quiet (3 s) and the closes (3 s at most);
    // event-stream heartbeats every 100 ms, counted as data, held it 2 x 60 s.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(40), "{name}: took {took:?}");
    // The edge closes its side once it has read each member's close; wait for every one.
    let until = Instant::now() + Duration::from_secs(20);
    let mut by = closed_by_reason(edge.http);
    while by.values().sum::<u64>() < members && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
        by = closed_by_reason(edge.http);
    }
    stop(&mut edge);
    assert_eq!(by.get("peer_reset").copied().unwrap_or(0), 0, "{name}: no member reset: {by:?}");
    assert_eq!(by.get("peer_closed").copied().unwrap_or(0), members, "{name}: every member closed: {by:?}");
    let v = result(&out);
    assert_eq!(v["connections"], members, "{name}: {v}");
    assert_eq!(v["closed_by_generator_at_end"], members, "{name}: every member's close went out: {v}");
    assert_eq!(v["close_unanswered_at_end"], 0, "{name}: the edge closed every one in time: {v}");
    assert_eq!(v["lost"]["gift"], 0, "{name}: {v}");
    let _ = std::fs::remove_dir_all(&out);
}

/// A publish endpoint nobody listens on (an edge gone): chat, droppable, is tried once per
/// message and counted as not accepted, never retried; the gift being retried at the end of
/// `--duration` is given up a short grace after it (5 s), not after `--gift-give-up` (30 s by
/// default), so the run ends soon after its duration. It took the duration plus 30 s: each
/// stream retried its message (chat too) for the whole give-up time.
#[test]
fn a_dead_publish_endpoint_does_not_hold_the_end_of_the_run() {
    let mut edge = EdgeProc::start(&["--shards", "1"]);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let out = roomcast_testsupport::scratch().join(format!("loadgen-end-dead-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let started = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &edge.ws.to_string(), "--http", &dead])
        .args(["--connections", "20", "--workers", "1", "--duration", "3", "--gift-rate", "5"])
        .args(["--chat-rate", "20", "--scenario", "end-dead", "--out", out.to_str().unwrap()])
        .output()
        .expect("loadgen");
    let took = started.elapsed();
    stop(&mut edge);
    let stderr = String::from_utf8_lossy(&o.stderr);
    // Generous: the connect phase, the 3 s, the 5 s grace, the settling; not the 30 s give-up (33.6 s before).
    assert!(took < Duration::from_secs(3 + 22), "took {took:?}: {stderr}");
    let v = result(&out);
    assert_eq!(v["published"]["gift"], 0, "{v}");
    assert_eq!(v["published"]["chat"], 0, "{v}");
    // Every chat message due in the 3 s was tried once, refused (no answer) and dropped.
    let offered = v["publish_offered"]["chat"].as_u64().unwrap();
    assert!(offered >= 40, "chat kept its pace, not stuck retrying one message: {v}");
    assert_eq!(v["publish_refused_by_status"]["chat error"], offered, "each tried once: {v}");
    assert_eq!(v["publish_not_accepted"]["chat"], offered, "{v}");
    // The one gift, retried from the start, was given up at the end's grace.
    assert_eq!(v["publish_offered"]["gift"], 1, "{v}");
    assert_eq!(v["publish_gave_up"]["gift"], 1, "{v}");
    assert!(stderr.contains("given up, unreachable (the run's end"), "{stderr}");
    // And the run did not do what it was asked: it fails (it exited 0, "did what it was asked").
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("gifts given up unacknowledged: 1 "), "{stderr}");
    assert!(v["run_errors"].to_string().contains("gifts given up unacknowledged: 1 "), "{v}");
    let _ = std::fs::remove_dir_all(&out);
}
