//! How a run ends: an edge that stopped answering publishes does not hold the run past its
//! `--duration` for long.

use std::process::Command;
use std::time::{Duration, Instant};

use roomcast_testsupport::EdgeProc;

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

/// A publish endpoint nobody listens on (an edge gone): chat, droppable, is tried once per
/// message and counted as not accepted, never retried; the gift being retried at the end of
/// `--duration` is given up a short grace after it (5 s), not after `--gift-give-up` (30 s by
/// default), so the run ends soon after its duration. It took the duration plus 30 s: each
/// stream retried its message (chat too) for the whole give-up time.
#[test]
fn a_dead_publish_endpoint_does_not_hold_the_end_of_the_run() {
    let mut edge = EdgeProc::start(&["--shards", "1"]);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let out = std::env::temp_dir().join(format!("loadgen-end-dead-{}", std::process::id()));
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
    // Generous: the connect phase, the 3 s, the 5 s grace, the settling; not the 30 s give-up.
    assert!(took < Duration::from_secs(3 + 15), "took {took:?}: {stderr}");
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
    let _ = std::fs::remove_dir_all(&out);
}
