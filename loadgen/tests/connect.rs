//! The connect phase: each worker keeps several first connects in flight (`--connect-inflight`)
//! while holding the ramp, and the phase gives up at `--connect-deadline`, saying how far it got.
//! Members whose first connect failed fail the run unless `--allow-connect-failures` accepts
//! them.

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
    let out = roomcast_testsupport::scratch().join(format!("loadgen-inflight-{}", std::process::id()));
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
    let out = roomcast_testsupport::scratch().join(format!("loadgen-deadline-{}", std::process::id()));
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

/// Half of 20 members go to a port nothing listens on (`--ws` names it beside the edge): their
/// first connects are refused and they never join. The run writes its results, then exits
/// non-zero saying how many never connected and why (it exited 0); with
/// `--allow-connect-failures 50%` the same run is accepted, and says so.
#[test]
fn members_that_never_connected_fail_the_run_unless_allowed() {
    let mut edge = EdgeProc::start(&["--shards", "1"]);
    let refusing = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let base = roomcast_testsupport::scratch().join(format!("loadgen-partial-{}", std::process::id()));
    let run = |name: &str, extra: &[&str]| {
        let out = base.join(name);
        let o = Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["run", "--ws", &format!("{},{refusing}", edge.ws), "--http", &edge.http.to_string()])
            .args(["--connections", "20", "--workers", "1", "--duration", "1", "--gift-rate", "5"])
            .args(["--chat-rate", "0", "--scenario", name, "--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .expect("loadgen");
        let dir = std::fs::read_dir(&out).unwrap().next().expect("results written").unwrap().path();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
        (o, v)
    };
    let (o, v) = run("strict", &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "members that never connected fail the run: {stderr}");
    assert!(
        stderr.contains("Error: 10 of 20 members never connected (first connects failed: refused: 10); a run fails"),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-connect-failures"), "says how to accept it: {stderr}");
    assert_eq!(v["connections"], 10, "{v}");
    assert_eq!(v["failed_by_reason"], serde_json::json!({ "refused": 10 }), "{v}");
    assert_eq!(v["connect_failures_allowed"], 0, "{v}");
    let errors = v["run_errors"].as_array().expect("run_errors");
    assert!(errors.len() == 1 && errors[0].as_str().unwrap().starts_with("10 of 20 members never connected"), "{v}");
    // The summary on stdout says so too.
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"run_errors\": [\n    \"10 of 20 members"), "{v}");

    let (o, v) = run("allowed", &["--allow-connect-failures", "50%"]);
    stop(&mut edge);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains(
            "10 of 20 members never connected (refused: 10): accepted, within --allow-connect-failures 50% (10)"
        ),
        "{stdout}"
    );
    assert_eq!(v["connect_failures_allowed"], 10, "{v}");
    assert_eq!(v["run_errors"], serde_json::json!([]), "{v}");
    assert_eq!(v["lost"]["gift"], 0, "the members that connected got every gift: {v}");
    let _ = std::fs::remove_dir_all(&base);
}
