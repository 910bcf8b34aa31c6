//! A short real run: the edge binary (built by the same `cargo test --workspace`), 2,000
//! connections for a few seconds, zero loss, and a complete result file.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use roomcast_testsupport::{EdgeProc, RedisProc};

#[test]
fn two_thousand_connections_no_loss_and_a_complete_result() {
    let (mut edge, ws, http) = edge(&["--shards", "2"]);
    let out = roomcast_testsupport::scratch().join(format!("loadgen-e2e-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &ws, "--http", &http, "--connections", "2000", "--workers", "2"])
        .args(["--duration", "3", "--gift-rate", "10", "--chat-rate", "50", "--scenario", "e2e"])
        .args(["--server-pid", &edge.child.id().to_string(), "--out", out.to_str().unwrap()])
        .status()
        .expect("loadgen");
    stop(&mut edge);
    assert!(status.success());
    let (dir, v) = result(&out);
    assert_eq!(v["connections"], 2000);
    assert_eq!(v["lost"]["gift"], 0, "{v}");
    assert_eq!(v["lost"]["chat"], 0, "{v}");
    assert_eq!(v["duplicates"]["gift"], 0);
    assert_eq!(v["published"]["gift"], 30);
    // Every connection got every message.
    assert_eq!(v["deliveries"].as_u64().unwrap(), 2000 * (30 + 150));
    for key in ["p50", "p99", "max"] {
        assert!(v["latency_ms"]["gift"][key].as_f64().unwrap() > 0.0);
    }
    assert!(v["edge_cpu_us_per_delivery"].as_f64().unwrap() > 0.0);
    // And from the edge's perf counters (task-clock is a software counter: every kernel).
    assert!(v["edge_shards_task_clock_us_per_delivery"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["edge_task_clock_us_per_delivery_by_thread"]["shard-0"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["edge_rss_bytes_per_connection"].is_number());
    for f in ["README.md", "latency.svg", "throughput.svg"] {
        assert!(dir.join(f).metadata().unwrap().len() > 100, "{f}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// Two runs on the same room at once: each counts only its own messages (the run id in each
/// body), so neither reports the other's gifts as losses or duplicates; the other's are counted
/// apart. Before, both numbered gifts 0, 1, 2... in the same room and each counted the other's
/// as duplicates.
#[test]
fn two_runs_on_the_same_room_count_only_their_own_messages() {
    let (mut edge, ws, http) = edge(&["--shards", "2"]);
    let runs: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let out = roomcast_testsupport::scratch().join(format!("loadgen-two-runs-{name}-{}", std::process::id()));
            let child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
                .args(["run", "--ws", &ws, "--http", &http, "--connections", "100", "--workers", "1"])
                .args(["--duration", "4", "--gift-rate", "10", "--chat-rate", "20", "--scenario", "two-runs"])
                .args(["--out", out.to_str().unwrap()])
                .stdout(Stdio::null())
                .spawn()
                .expect("loadgen");
            (out, child)
        })
        .collect();
    let mut results = Vec::new();
    for (out, mut child) in runs {
        let status = child.wait().unwrap();
        let (_, v) = result(&out);
        let _ = std::fs::remove_dir_all(&out);
        results.push((status, v));
    }
    stop(&mut edge);
    for (status, v) in &results {
        assert_eq!(v["lost"]["gift"], 0, "{v}");
        assert_eq!(v["duplicates"]["gift"], 0, "{v}");
        assert_eq!(v["duplicates"]["chat"], 0, "{v}");
        assert!(v["foreign_messages"].as_u64().unwrap() > 0, "the other run's messages reached it: {v}");
        assert!(status.success(), "{v}");
    }
}

#[test]
fn members_over_tls_lose_nothing() {
    let pki = roomcast_testsupport::TestPki::new("loadgen-tls");
    pki.issue(1, "edge", roomcast_testsupport::KeyAlg::EcdsaP256);
    let (cert, key) = (pki.cert_path(), pki.key_path());
    let (mut edge, ws, http) = edge(&["--shards", "2", "--tls-cert", &cert, "--tls-key", &key]);
    let ca = pki.dir.join("ca.pem");
    let out = roomcast_testsupport::scratch().join(format!("loadgen-tls-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &ws, "--http", &http, "--connections", "500", "--workers", "2"])
        .args(["--duration", "3", "--gift-rate", "10", "--chat-rate", "50", "--scenario", "tls"])
        .args(["--tls-ca", ca.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .status()
        .expect("loadgen");
    stop(&mut edge);
    assert!(status.success());
    let (_, v) = result(&out);
    assert_eq!(v["connections"], 500);
    assert_eq!(v["lost"]["gift"], 0, "{v}");
    assert_eq!(v["lost"]["chat"], 0, "{v}");
    assert_eq!(v["deliveries"].as_u64().unwrap(), 500 * (30 + 150), "every member got every message over wss");
    let _ = std::fs::remove_dir_all(&out);
}

/// Chat offered in batches (`--chat-batch`, the edge's `POST /v1/messages`) to a room hot
/// enough to be sampled: the sampled-out messages are refused (202) and leave holes in the
/// publisher's numbering, which are not counted lost; every accepted message reaches every
/// member, and gifts go one per request as before.
#[test]
fn batched_chat_is_sampled_and_nothing_accepted_is_lost() {
    let cfg = roomcast_testsupport::config(
        "loadgen-batch",
        "[adaptive]\nroom_deliveries_per_s = 10000\nvisible_rate = 20\nmin_visible_rate = 5\n",
    );
    let (mut edge, ws, http) = edge(&["--shards", "2", "--config", &cfg]);
    let out = roomcast_testsupport::scratch().join(format!("loadgen-batch-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &ws, "--http", &http, "--connections", "500", "--workers", "1"])
        .args(["--duration", "3", "--gift-rate", "10", "--chat-rate", "400", "--chat-batch", "50"])
        .args(["--scenario", "batch", "--out", out.to_str().unwrap()])
        .status()
        .expect("loadgen");
    stop(&mut edge);
    assert!(status.success());
    let (_, v) = result(&out);
    let published = |k: &str| v["published"][k].as_u64().unwrap();
    assert_eq!(published("gift"), 30, "{v}");
    assert!(published("chat") > 0, "{v}");
    assert!(
        v["publish_refused_by_status"]["chat 202"].as_u64().unwrap_or(0) > 0,
        "the hot room's chat was sampled: {v}"
    );
    assert_eq!(v["lost"]["gift"], 0, "{v}");
    assert_eq!(v["lost"]["chat"], 0, "sampled-out chat is not lost: {v}");
    assert_eq!(v["deliveries"].as_u64().unwrap(), 500 * (published("gift") + published("chat")), "{v}");
    let _ = std::fs::remove_dir_all(&out);
}

/// An edge killed mid-run and never started again: every member loses its socket and retries
/// to the end. The run still writes its results, then exits non-zero saying how many members
/// were down at the end (it exited 0: only lost workers failed a run).
#[test]
fn a_run_whose_edge_died_fails_and_names_the_members_down() {
    let (ok, stderr, v) = run_whose_edge_dies("died", &[]);
    assert!(!ok, "a run whose members were down at the end does not exit 0: {stderr}");
    assert!(
        stderr.contains("50 of 50 members were not connected at the end (50 still reconnecting 10 s or more"),
        "{stderr}"
    );
    assert_eq!(v["connections"], 50, "{v}");
    assert_eq!(v["members_open_at_end"], 0, "{v}");
    assert_eq!(v["members_reconnecting_at_end"], 50, "{v}");
    // Killed, the edge sent no close frame: each member's socket ended once, counted by how
    // (a trial found these runs' results saying "closes received: none" and nothing else).
    assert_eq!(v["closes_by_code"], serde_json::json!({}), "{v}");
    let lost: u64 = v["sockets_lost_by_reason"]
        .as_object()
        .expect("sockets_lost_by_reason")
        .values()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    assert_eq!(lost, 50, "every member's socket, lost once: {v}");
}

/// `--move-give-up` bounds a member's retries: with 2 s, the members of an edge that never
/// comes back are given up a few seconds after it died (not after a fixed 120 s, which no run
/// this short ever reached), and the error names the run's 2 s; with 0 they are never given
/// up and end the run still reconnecting, as a real client would.
#[test]
fn moves_are_given_up_after_the_runs_move_give_up() {
    let (ok, stderr, v) = run_whose_edge_dies("give-up-2", &["--move-give-up", "2"]);
    assert!(!ok, "{stderr}");
    assert_eq!(v["reconnect_failed"], 50, "every member's move was given up: {v}");
    assert_eq!(v["members_reconnecting_at_end"], 0, "{v}");
    assert!(stderr.contains("50 of 50 members were not connected at the end (0 still reconnecting"), "{stderr}");
    assert!(stderr.contains(", 50 moves given up after 2 s, 0 closed and not followed)"), "{stderr}");
    assert!(v["args"].as_str().unwrap().contains("move_give_up: 2.0"), "the flag is in the results: {v}");

    let (ok, stderr, v) = run_whose_edge_dies("give-up-0", &["--move-give-up", "0"]);
    assert!(!ok, "{stderr}");
    assert_eq!(v["reconnect_failed"], 0, "no move is ever given up: {v}");
    assert_eq!(v["members_reconnecting_at_end"], 50, "{v}");
    assert!(stderr.contains(", 0 moves given up (never: --move-give-up 0), "), "{stderr}");
}

/// Runs 50 members (one worker, gifts 5/s for 3 s, each given up after 1 s unacknowledged) on
/// an edge killed once publishing starts and never started again, with `extra` flags; returns
/// whether the run exited 0, its stderr and its result.json.
fn run_whose_edge_dies(name: &str, extra: &[&str]) -> (bool, String, serde_json::Value) {
    let (mut edge, ws, http) = edge(&["--shards", "1"]);
    let dir = roomcast_testsupport::scratch().join(format!("loadgen-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let mut lg = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &ws, "--http", &http, "--connections", "50", "--workers", "1"])
        .args(["--duration", "3", "--gift-rate", "5", "--chat-rate", "0", "--gift-give-up", "1"])
        .args(["--scenario", name, "--out", out.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr.txt")).unwrap())
        .spawn()
        .expect("loadgen");
    let mut killed = false;
    for line in BufReader::new(lg.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if !killed && line.starts_with("t=") {
            edge.kill9();
            killed = true;
        }
    }
    assert!(killed, "the run reached publishing");
    let status = lg.wait().unwrap();
    let stderr = std::fs::read_to_string(dir.join("stderr.txt")).unwrap();
    let (_, v) = result(&out);
    let _ = std::fs::remove_dir_all(&dir);
    (status.success(), stderr, v)
}

/// The one run's folder under `out` and its result.json.
fn result(out: &std::path::Path) -> (std::path::PathBuf, serde_json::Value) {
    let dir = std::fs::read_dir(out).unwrap().next().unwrap().unwrap().path();
    let v = serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    (dir, v)
}

/// Starts an edge with `args` (later flags win) on its own data directory; returns it and its
/// (ws, http) addresses.
fn edge(args: &[&str]) -> (EdgeProc, String, String) {
    let e = EdgeProc::start(args);
    let (ws, http) = (e.ws.to_string(), e.http.to_string());
    (e, ws, http)
}

/// Stops an edge as an operator's Ctrl-C would, and waits for it.
fn stop(e: &mut EdgeProc) {
    let _ = Command::new("kill").args(["-INT", &e.child.id().to_string()]).status();
    let _ = e.wait_exit(Duration::from_secs(30));
}

#[test]
fn connections_follow_goaway_to_another_edge_without_losing_a_gift() {
    const TOKEN: &str = "loadgen-e2e-drain-token";
    let redis = RedisProc::start();
    let bus = redis.url();
    let dir = roomcast_testsupport::scratch().join(format!("loadgen-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("edge.toml");
    std::fs::write(&cfg, format!("admin_token = \"{TOKEN}\"\n[drain]\nperiod_ms = 1000\ndeadline_ms = 10000\n"))
        .unwrap();
    let cfg = cfg.to_str().unwrap();
    let (mut a, a_ws, a_http) = edge(&["--shards", "1", "--bus", &bus, "--config", cfg]);
    let (mut b, _, b_http) = edge(&["--shards", "1", "--bus", &bus, "--config", cfg]);
    // Every connection starts on A; publishes go through B (A leaves mid-run).
    let out = dir.join("out");
    let mut lg = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &a_ws, "--http", &b_http, "--connections", "600", "--workers", "2"])
        .args(["--duration", "7", "--gift-rate", "10", "--chat-rate", "20", "--scenario", "drain"])
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("loadgen");
    // Drain A once publishing has run for a couple of seconds.
    let mut lines = BufReader::new(lg.stdout.take().unwrap()).lines();
    let mut drained = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if !drained && line.starts_with("t=") && line.contains("s conns=") {
            let t: f64 = line[2..].split('s').next().unwrap().trim().parse().unwrap();
            if t >= 2.0 {
                let mut s = std::net::TcpStream::connect(&a_http).unwrap();
                std::io::Write::write_all(
                    &mut s,
                    format!(
                        "POST /v1/admin/drain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
                         Content-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .unwrap();
                let mut answer = String::new();
                std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
                assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
                drained = true;
            }
        }
    }
    assert!(drained, "the run reached the drain point");
    assert!(lg.wait().unwrap().success(), "loadgen run");
    assert_eq!(a.wait_exit(Duration::from_secs(60)), Some(0), "the drained edge exits 0");
    stop(&mut b);
    let run = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap();
    assert_eq!(v["reconnects"], 600, "every connection moved: {v}");
    assert_eq!(v["reconnect_failed"], 0);
    assert_eq!(v["lost"]["gift"], 0, "no gift lost across the move: {v}");
    assert_eq!(v["duplicates"]["gift"], 0, "none twice: {v}");
    assert_eq!(v["published"]["gift"], 70);
    assert!(v["reconnect_ms"]["p99"].as_f64().unwrap() > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Slow readers closed as slow consumers (4000) come back with `since`, as a real client does,
/// and end with every gift: loss in a result means gifts no client could get, not closes.
#[test]
fn readers_closed_as_slow_consumers_resume_and_lose_no_gift() {
    let dir = roomcast_testsupport::scratch().join(format!("loadgen-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("edge.toml");
    // A tiny queue and kernel buffer: 30 KB/s of gifts overflow an 8 KB/s reader within a second.
    std::fs::write(
        &cfg,
        "[fanout]\nmax_batch_bytes = 2048\n[send]\nmax_queue_bytes = 4096\nsocket_send_buffer = 4096\n",
    )
    .unwrap();
    let (mut edge, ws, http) = edge(&["--shards", "1", "--config", cfg.to_str().unwrap()]);
    let out = dir.join("out");
    let status = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &ws, "--http", &http, "--connections", "300", "--workers", "1"])
        .args(["--duration", "2", "--gift-rate", "50", "--chat-rate", "0", "--pad", "512", "--scenario", "resume"])
        .args(["--slow-every", "3", "--slow-rcvbuf", "4096", "--slow-bytes", "4096"])
        .args(["--out", out.to_str().unwrap()])
        .status()
        .expect("loadgen");
    stop(&mut edge);
    assert!(status.success());
    let run = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap();
    assert!(v["resumed_after_close"].as_u64().unwrap() > 0, "slow readers were closed and resumed: {v}");
    // The closes are in the results by code: slow-consumer closes (4000), maybe replay-budget
    // ones (1013), nothing else.
    let codes = v["closes_by_code"].as_object().expect("closes_by_code");
    assert!(codes.get("4000").and_then(serde_json::Value::as_u64).unwrap_or(0) > 0, "{v}");
    assert!(codes.keys().all(|k| k == "4000" || k == "1013"), "{v}");
    assert_eq!(v["reconnect_failed"], 0, "{v}");
    assert_eq!(v["lost"]["gift"], 0, "every gift reached every reader: {v}");
    assert_eq!(v["duplicates"]["gift"], 0, "{v}");
    assert_eq!(v["published"]["gift"], 100);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the generator (one worker, gifts 5/s for 4 s, no chat) against an edge with the `[ws]`
/// settings `ws_cfg`; returns result.json and the result's README.
fn run_against(name: &str, ws_cfg: &str, connections: u32) -> (serde_json::Value, String) {
    let dir = roomcast_testsupport::scratch().join(format!("loadgen-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("edge.toml");
    std::fs::write(&cfg, format!("[ws]\n{ws_cfg}")).unwrap();
    let (mut edge, ws, http) = edge(&["--shards", "2", "--config", cfg.to_str().unwrap()]);
    let out = dir.join("out");
    let status = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &ws, "--http", &http, "--connections", &connections.to_string(), "--workers", "1"])
        .args(["--duration", "4", "--gift-rate", "5", "--chat-rate", "0", "--scenario", &format!("e2e-{name}")])
        .args(["--out", out.to_str().unwrap()])
        .status()
        .expect("loadgen");
    stop(&mut edge);
    assert!(status.success());
    let res = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    let v = serde_json::from_str(&std::fs::read_to_string(res.join("result.json")).unwrap()).unwrap();
    let readme = std::fs::read_to_string(res.join("README.md")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (v, readme)
}

/// The edge pings every 200 ms and closes a connection it has not heard from for 1 s: the
/// generator's members answer pings (as browsers do), so a run longer than the idle timeout
/// keeps every member and loses nothing. Without pongs every member is closed ("1001 idle
/// timeout") within the first seconds and misses the rest of the run.
#[test]
fn members_answer_pings_and_outlive_the_idle_timeout() {
    let (v, _) = run_against("ping", "ping_interval_ms = 200\nidle_timeout_ms = 1000\n", 200);
    assert_eq!(v["connections"], 200, "{v}");
    assert_eq!(v["published"]["gift"], 20, "{v}");
    assert_eq!(v["lost"]["gift"], 0, "{v}");
    assert_eq!(v["deliveries"].as_u64().unwrap(), 200 * 20, "{v}");
    // Nobody was closed by the edge during the run, so nobody came back.
    assert_eq!(v["reconnects"], 0, "{v}");
    assert_eq!(v["closed_during_run"], 0, "{v}");
    assert_eq!(v["closes_by_code"], serde_json::json!({}), "no close frame during the run: {v}");
}

/// Members the edge closes with a close frame other than 4000/1013 (here 1001, idle: the edge
/// sends no pings and times members out after 1 s) are counted by code and come back with
/// `since`, as a client would, instead of silently dropping out while the results still said
/// every member was connected.
#[test]
fn members_closed_for_idleness_are_counted_and_come_back() {
    let (v, readme) = run_against("idle", "ping_interval_ms = 0\nidle_timeout_ms = 1000\n", 100);
    assert!(v["closes_by_code"]["1001"].as_u64().unwrap_or(0) >= 100, "every member idled out at least once: {v}");
    assert!(v["reconnects"].as_u64().unwrap() >= 100, "and came back: {v}");
    assert_eq!(v["closed_during_run"], 0, "none dropped out for good: {v}");
    assert!(readme.contains("| closes received, by code | 1001: "), "{readme}");
}
