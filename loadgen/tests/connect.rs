//! The connect phase: each worker keeps several first connects in flight (`--connect-inflight`)
//! while holding the ramp, and the phase gives up at `--connect-deadline`, saying how far it got.

use std::process::Command;
use std::time::Duration;

use roomcast_testsupport::EdgeProc;

fn stop(e: &mut EdgeProc) {
    let _ = Command::new("kill").args(["-INT", &e.child.id().to_string()]).status();
    let _ = e.wait_exit(Duration::from_secs(30));
}

/// 3,000 members on a ramp far faster than one loopback handshake per connect allows one at a
/// time: every one connects, none fails, every one gets the gifts, and the result shows that a
/// worker had more than one connect in flight (and never more than the window).
#[test]
fn many_members_connect_with_several_in_flight() {
    let mut edge = EdgeProc::start(&["--shards", "2"]);
    let out = std::env::temp_dir().join(format!("loadgen-inflight-{}", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &edge.ws.to_string(), "--http", &edge.http.to_string()])
        .args(["--connections", "3000", "--workers", "2", "--ramp", "30000", "--connect-inflight", "16"])
        .args(["--duration", "2", "--gift-rate", "5", "--chat-rate", "0", "--scenario", "inflight"])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .expect("loadgen");
    stop(&mut edge);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("connected 3000 (failed 0)"), "{stdout}");
    let dir = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(v["connections"], 3000, "{v}");
    assert_eq!(v["failed_connections"], 0, "{v}");
    let peak = v["connect_inflight_peak"].as_u64().unwrap();
    assert!(peak > 1 && peak <= 16, "in flight at once per worker: {peak}");
    assert_eq!(v["lost"]["gift"], 0, "{v}");
    assert_eq!(v["deliveries"].as_u64().unwrap(), 3000 * v["published"]["gift"].as_u64().unwrap(), "{v}");
    let _ = std::fs::remove_dir_all(&out);
}

/// A connect phase that cannot finish in time (2,000 members at 100/s, given 2 s) ends at the
/// deadline it was given rather than the default (70 s), saying how far it got and how to give
/// it longer. Its per-second lines show the rate members connect at from the first one (which
/// read 0/s: printed before any worker had reported).
#[test]
fn the_connect_deadline_is_honoured() {
    let mut edge = EdgeProc::start(&["--shards", "1"]);
    let out = std::env::temp_dir().join(format!("loadgen-deadline-{}", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &edge.ws.to_string(), "--http", &edge.http.to_string()])
        .args(["--connections", "2000", "--workers", "1", "--ramp", "100", "--connect-deadline", "2"])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .expect("loadgen");
    stop(&mut edge);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("connect phase timed out after 2 s: "), "{stderr}");
    assert!(stderr.contains("give it longer with --connect-deadline SECS"), "{stderr}");
    let connected: u64 =
        stderr.split("timed out after 2 s: ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(connected < 2000, "{stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let first = stdout.lines().find(|l| l.starts_with("connecting t=")).expect("a connect line");
    let rate: f64 = first.split(" (").nth(1).unwrap().split("/s)").next().unwrap().parse().unwrap();
    assert!(rate > 0.0, "the first line's rate: {stdout}");
    let _ = std::fs::remove_dir_all(&out);
}
