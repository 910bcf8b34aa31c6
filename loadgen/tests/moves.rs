//! Moves on the worker's loop: members told to go ask dispatch and reconnect each on its own,
//! bounded by the window of moves in flight (`--connect-inflight`), not by a pool of threads.
//!
//! Edge A drains (SIGTERM) with `--dispatch-url` naming a stand-in dispatch here, which sends
//! every member to edge B (same Redis bus, so `since` replays what a member missed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use roomcast_testsupport::{EdgeProc, RedisProc};

/// What the stand-in dispatch saw.
#[derive(Default)]
struct Seen {
    /// Requests answered so far, and held right now.
    asked: usize,
    held: usize,
    /// The most requests held at once.
    peak: usize,
    /// Every member's request has been held at once: answer all, hold none from now on.
    released: bool,
}

/// How the stand-in answers.
#[derive(Clone, Copy)]
enum Mode {
    /// Hold each request until `n` are held at once (then answer them all), or for at most
    /// `hold`: a dispatch that answers slowly, or only when everyone asks together.
    Gather { n: usize, hold: Duration },
    /// Answer the first `n` requests 503 (no edge takes members), the rest at once.
    RefuseFirst { n: usize },
    /// Answer the first `n` requests after `hold` (past the generator's 5 s), the rest at once.
    SlowFirst { n: usize, hold: Duration },
    /// Answer every request with these bytes (garbage: not HTTP, or a body without a URL).
    Raw(&'static [u8]),
    /// Send every room to edge B by a host name (`ws://localhost:PORT/...`), as a fleet that
    /// advertises names does.
    ByName,
}

/// A stand-in for `/v1/route` sending every room to `ws` (edge B), one thread per request;
/// returns its URL and what it saw.
fn dispatch(ws: SocketAddr, mode: Mode) -> (String, Arc<(Mutex<Seen>, Condvar)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/route", l.local_addr().unwrap());
    let seen = Arc::new((Mutex::new(Seen::default()), Condvar::new()));
    let shared = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let seen = shared.clone();
            std::thread::spawn(move || answer(s, ws, mode, &seen));
        }
    });
    (url, seen)
}

fn answer(mut s: TcpStream, ws: SocketAddr, mode: Mode, seen: &(Mutex<Seen>, Condvar)) {
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let room = head.split(['?', '&', ' ']).find_map(|p| p.strip_prefix("room=")).unwrap_or("r0").to_owned();
    let (lock, cv) = seen;
    let mut g = lock.lock().unwrap();
    g.asked += 1;
    let refuse = matches!(mode, Mode::RefuseFirst { n } if g.asked <= n);
    let slow = match mode {
        Mode::SlowFirst { n, hold } if g.asked <= n => Some(hold),
        _ => None,
    };
    if let Mode::Gather { n, hold } = mode {
        g.held += 1;
        g.peak = g.peak.max(g.held);
        if g.held >= n {
            g.released = true;
            cv.notify_all();
        }
        let until = Instant::now() + hold;
        while !g.released && Instant::now() < until {
            g = cv.wait_timeout(g, until.saturating_duration_since(Instant::now())).unwrap().0;
        }
        g.held -= 1;
    }
    drop(g);
    if let Some(hold) = slow {
        std::thread::sleep(hold);
    }
    if let Mode::Raw(bytes) = mode {
        let _ = s.write_all(bytes);
        return;
    }
    let answer = if refuse {
        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
    } else {
        let host = if matches!(mode, Mode::ByName) { format!("localhost:{}", ws.port()) } else { ws.to_string() };
        let body = format!("{{\"url\":\"ws://{host}/ws?room={room}\"}}");
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let _ = s.write_all(answer.as_bytes());
}

/// Relays the run's lines and drains `a` (SIGTERM) once the run is `at` seconds in.
fn drain_past(lg: &mut std::process::Child, a: &mut EdgeProc, at: f64) {
    let mut drained = false;
    for line in BufReader::new(lg.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        println!("{line}");
        if !drained && line.starts_with("t=") && line.contains("s conns=") {
            let t: f64 = line[2..].split('s').next().unwrap().trim().parse().unwrap();
            if t >= at {
                a.sigterm();
                drained = true;
            }
        }
    }
    assert!(drained, "the run reached the drain point");
}

/// Runs `members` members (one worker, `inflight` connects and moves in flight) on edge A,
/// drains A once publishing has run a second and a half, with its goaways naming the stand-in
/// dispatch in `mode`, and expects the run to exit 0; returns result.json and what the
/// stand-in saw.
fn drain_through(name: &str, members: usize, inflight: usize, mode: Mode) -> (serde_json::Value, Seen) {
    let (v, seen, ok, stderr) = drain_through_ending(name, members, inflight, mode);
    assert!(ok, "loadgen run: {stderr}");
    (v, seen)
}

/// As [`drain_through`], however the run ends: also whether it exited 0, and its stderr.
fn drain_through_ending(
    name: &str,
    members: usize,
    inflight: usize,
    mode: Mode,
) -> (serde_json::Value, Seen, bool, String) {
    drain_through_config(name, members, inflight, mode, "")
}

/// As [`drain_through_ending`], with `config` (TOML tables) added to both edges' config.
fn drain_through_config(
    name: &str,
    members: usize,
    inflight: usize,
    mode: Mode,
    config: &str,
) -> (serde_json::Value, Seen, bool, String) {
    drain_through_args(name, members, inflight, mode, config, &[])
}

/// As [`drain_through_config`], with `extra` arguments to `loadgen run`.
fn drain_through_args(
    name: &str,
    members: usize,
    inflight: usize,
    mode: Mode,
    config: &str,
    extra: &[&str],
) -> (serde_json::Value, Seen, bool, String) {
    let redis = RedisProc::start();
    let bus = redis.url();
    let dir = roomcast_testsupport::scratch().join(format!("loadgen-moves-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("edge.toml");
    std::fs::write(&cfg, format!("[drain]\nperiod_ms = 500\ndeadline_ms = 10000\n{config}")).unwrap();
    let cfg = cfg.to_str().unwrap();
    let mut b = EdgeProc::start(&["--shards", "1", "--bus", &bus, "--config", cfg]);
    let (url, seen) = dispatch(b.ws, mode);
    let mut a = EdgeProc::start(&["--shards", "1", "--bus", &bus, "--config", cfg, "--dispatch-url", &url]);
    let out = dir.join("out");
    let mut lg = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &a.ws.to_string(), "--http", &b.http.to_string()])
        .args(["--connections", &members.to_string(), "--workers", "1"])
        .args(["--connect-inflight", &inflight.to_string()])
        .args(["--duration", "6", "--gift-rate", "5", "--chat-rate", "0", "--scenario", name])
        .args(["--out", out.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr.txt")).unwrap())
        .spawn()
        .expect("loadgen");
    drain_past(&mut lg, &mut a, 1.5);
    let ok = lg.wait().unwrap().success();
    let stderr = std::fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default();
    assert_eq!(a.wait_exit(Duration::from_secs(60)), Some(0), "the drained edge exits 0");
    let _ = Command::new("kill").args(["-INT", &b.child.id().to_string()]).status();
    let _ = b.wait_exit(Duration::from_secs(30));
    let run = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    let v = serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let seen = std::mem::take(&mut *seen.0.lock().unwrap());
    (v, seen, ok, stderr)
}

/// 120 members sent away at once, and a dispatch that answers no one until all 120 have asked
/// (holding each request at most 4 s, under the old blocking client's 5 s timeout): every
/// member asks at the same time, because each move proceeds on its own. With a pool of 32
/// blocking movers per worker, at most 32 asked at once and the rest waited their turn.
#[test]
fn members_sent_away_together_all_ask_dispatch_at_once() {
    const MEMBERS: usize = 120;
    let mode = Mode::Gather { n: MEMBERS, hold: Duration::from_secs(4) };
    let (v, seen) = drain_through("together", MEMBERS, 128, mode);
    assert_eq!(seen.peak, MEMBERS, "dispatch requests in flight at once: {} of {MEMBERS}", seen.peak);
    assert_eq!(seen.asked, MEMBERS, "one request per member, none retried: {v}");
    assert_eq!(v["reconnects"], MEMBERS, "every member moved: {v}");
    assert_eq!(v["reconnect_failed"], 0, "{v}");
    assert_eq!(v["move_inflight_peak"], MEMBERS, "moves in flight at once in the worker: {v}");
    assert_eq!(v["lost"]["gift"], 0, "no gift lost across the move: {v}");
    assert_eq!(v["duplicates"]["gift"], 0, "{v}");
}

/// The window bounds the moves in flight: with `--connect-inflight 8`, a dispatch that waits for
/// everyone never sees more than 8 at once (each is answered after a 300 ms hold), and every
/// member still moves. And dispatch answering 503 is counted by reason and retried.
#[test]
fn moves_in_flight_stay_within_the_window_and_refusals_are_retried() {
    let (v, seen) = drain_through("window", 40, 8, Mode::Gather { n: 40, hold: Duration::from_millis(300) });
    assert!(seen.peak <= 8, "at most the window in flight: {}", seen.peak);
    assert!(v["move_inflight_peak"].as_u64().unwrap() <= 8, "{v}");
    assert_eq!(v["reconnects"], 40, "{v}");
    assert_eq!(v["lost"]["gift"], 0, "{v}");

    let (v, seen) = drain_through("refused", 40, 32, Mode::RefuseFirst { n: 40 });
    assert_eq!(seen.asked, 80, "each member asked twice: refused, then sent to B");
    assert_eq!(v["reconnects"], 40, "{v}");
    assert_eq!(v["reconnect_failed"], 0, "{v}");
    assert_eq!(v["reconnect_attempts_failed_by_reason"], serde_json::json!({ "dispatch_http_503": 40 }), "{v}");
    assert_eq!(v["lost"]["gift"], 0, "{v}");
}

/// A dispatch that answers after the generator's 5 s is a timeout, retried, and the members
/// still move: taking an answer that waited for the worker to read it before calling an attempt
/// timed out must not hide a server that really answered late.
#[test]
fn answers_after_the_deadline_are_timeouts_and_retried() {
    const MEMBERS: usize = 10;
    let (v, seen) = drain_through("slow", MEMBERS, 32, Mode::SlowFirst { n: MEMBERS, hold: Duration::from_secs(7) });
    assert_eq!(seen.asked, 2 * MEMBERS, "each member asked twice: too late, then sent to B");
    let by = v["reconnect_attempts_failed_by_reason"].as_object().expect("by reason");
    assert_eq!(by.get("dispatch_timeout").and_then(serde_json::Value::as_u64), Some(MEMBERS as u64), "{v}");
    assert_eq!(v["move_answers_read_late"], 0, "nothing had arrived when the attempts expired: {v}");
    assert_eq!(v["reconnects"], MEMBERS, "{v}");
    assert_eq!(v["lost"]["gift"], 0, "{v}");
}

/// Gifts are must-deliver, so a run that measured one lost fails: here the edges keep one gift
/// of history and the members are away for 3 s (dispatch holds their requests) while gifts
/// flow at 5 a second, so each resumes past a `gap`. It exited 0, the loss only in its figures.
#[test]
fn a_run_that_lost_a_gift_fails() {
    const MEMBERS: usize = 10;
    let mode = Mode::Gather { n: usize::MAX, hold: Duration::from_secs(3) };
    let (v, _, ok, stderr) = drain_through_config("lost", MEMBERS, 32, mode, "[history]\nmust_deliver = 1\n");
    let lost = v["lost"]["gift"].as_u64().expect("lost gifts");
    assert!(lost > 0, "members away 3 s with one gift of history lost some: {v}");
    assert_eq!(v["reconnects"], MEMBERS, "every member moved: {v}");
    assert!(!ok, "a run that lost gifts exited 0");
    assert!(stderr.contains(&format!("{lost} gift deliveries lost")), "{stderr}");
    // The edge said so: one `gap` per member's resume, naming every gift it lost (the
    // generator did not count them).
    assert_eq!(v["gaps_and_resets"], serde_json::json!({ "gap": MEMBERS, "reset": 0 }), "{v}");
    // Seqs, not gifts: a gap may name a seq that is not a gift this member is counted to
    // have lost (one run's gaps named 150 seqs for 149 gifts lost), never fewer.
    let named = v["gap_seqs"].as_u64().expect("gap_seqs");
    assert!(named >= lost, "every gift lost was named by a gap ({named} seqs named, {lost} lost): {v}");
}

/// The same over event streams (`--sse`: the `gap` comes as an event's JSON envelope, where
/// WebSocket members above read it from an rkyv frame).
#[test]
fn gaps_are_counted_over_event_streams() {
    const MEMBERS: usize = 10;
    let mode = Mode::Gather { n: usize::MAX, hold: Duration::from_secs(3) };
    let config = "[history]\nmust_deliver = 1\n";
    let (v, _, ok, _) = drain_through_args("gap-sse", MEMBERS, 32, mode, config, &["--sse"]);
    assert!(!ok, "gifts were lost: {v}");
    assert_eq!(v["encoding"], "sse", "{v}");
    assert_eq!(v["reconnects"], MEMBERS, "every member moved: {v}");
    let lost = v["lost"]["gift"].as_u64().expect("lost gifts");
    assert!(lost > 0, "{v}");
    assert_eq!(v["gaps_and_resets"], serde_json::json!({ "gap": MEMBERS, "reset": 0 }), "{v}");
    // Seqs, not gifts: a gap may name a seq that is not a gift this member is counted to
    // have lost (one run's gaps named 150 seqs for 149 gifts lost), never fewer.
    let named = v["gap_seqs"].as_u64().expect("gap_seqs");
    assert!(named >= lost, "every gift lost was named by a gap ({named} seqs named, {lost} lost): {v}");
}

/// A dispatch answering garbage (not HTTP; or a 200 whose body has no `url`) is counted under a
/// reason of its own, `dispatch_bad_answer`, not the catch-all `dispatch_handshake` (which says
/// "the upgrade answer was wrong"); the members never move, so the run ends in error saying
/// they were not connected at the end.
#[test]
fn garbage_from_dispatch_is_counted_as_a_bad_answer() {
    const MEMBERS: usize = 20;
    let cases: [(&str, &[u8]); 2] = [
        ("not-http", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
        ("no-url", b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\nconnection: close\r\n\r\n{\"where\":\"b\"}  "),
    ];
    for (name, answer) in cases {
        let (v, seen, ok, stderr) = drain_through_ending(name, MEMBERS, 32, Mode::Raw(answer));
        assert!(seen.asked >= MEMBERS, "{name}: every member asked: {}", seen.asked);
        let by = v["reconnect_attempts_failed_by_reason"].as_object().expect("by reason");
        assert_eq!(by.keys().collect::<Vec<_>>(), ["dispatch_bad_answer"], "{name}: {v}");
        assert!(by["dispatch_bad_answer"].as_u64().unwrap() >= MEMBERS as u64, "{name}: {v}");
        assert_eq!(v["reconnects"], 0, "{name}: {v}");
        assert_eq!(v["members_open_at_end"], 0, "{name}: {v}");
        assert!(!ok, "{name}: members down at the end fail the run");
        assert!(stderr.contains(&format!("{MEMBERS} of {MEMBERS} members were not connected at the end")), "{stderr}");
    }
}

/// A dispatch answering a host name (`ws://localhost:PORT`) rather than an IP: the name is
/// looked up once and every member moves (it was counted as `dispatch_handshake`, retried until
/// given up).
#[test]
fn a_host_name_from_dispatch_is_looked_up_and_followed() {
    let (v, seen) = drain_through("by-name", 30, 32, Mode::ByName);
    assert_eq!(seen.asked, 30, "one request per member: {v}");
    assert_eq!(v["reconnects"], 30, "{v}");
    assert_eq!(v["reconnect_attempts_failed_by_reason"], serde_json::json!({}), "{v}");
    assert_eq!(v["members_open_at_end"], 30, "{v}");
    assert_eq!(v["lost"]["gift"], 0, "{v}");
}

/// Members run with `--no-follow-goaway` stay away when their edge drains: the run fails
/// saying they were closed and not followed. A trial found them counted as "on their way back"
/// (1,000 of 2,000 `members_moving_at_end`), so that error never fired.
#[test]
fn members_that_do_not_follow_a_goaway_are_not_on_their_way_back() {
    const MEMBERS: usize = 10;
    let mode = Mode::RefuseFirst { n: 0 };
    let (v, seen, ok, stderr) = drain_through_args("nofollow", MEMBERS, 32, mode, "", &["--no-follow-goaway"]);
    assert!(!ok, "members gone for good: {stderr}");
    assert_eq!(seen.asked, 0, "nobody asked dispatch: {v}");
    assert_eq!(v["members_moving_at_end"], 0, "{v}");
    assert_eq!(v["reconnects"], 0, "{v}");
    assert!(
        stderr.contains(&format!("{MEMBERS} of {MEMBERS} members were not connected at the end"))
            && stderr.contains(&format!("{MEMBERS} closed and not followed")),
        "{stderr}"
    );
}

/// A real `edge dispatch` whose only edge drains (so every route it answers is a 503) and
/// members that give up after 2 s: each member's every refused request is counted, the last
/// one before it gave up included, so the run's `dispatch_http_503` is dispatch's own count of
/// its refusals (`roomcast_dispatch_answers_total{outcome!="routed"}`). It was one fewer per
/// member: the attempt a move was given up on went uncounted.
#[test]
fn every_refusal_dispatch_answered_is_counted() {
    const MEMBERS: u64 = 10;
    let redis = RedisProc::start();
    /// `edge dispatch`, killed when the test ends, failed or not.
    struct Dispatch(std::process::Child);
    impl Drop for Dispatch {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut dispatch = Dispatch(
        Command::new(roomcast_testsupport::edge_bin())
            .args(["dispatch", "--redis", &redis.url(), "--http", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("edge dispatch"),
    );
    let mut line = String::new();
    BufReader::new(dispatch.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let http = line.split_whitespace().find_map(|w| w.strip_prefix("http=")).expect("http=").to_owned();
    let dir = roomcast_testsupport::scratch().join(format!("loadgen-moves-dispatch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("edge.toml");
    std::fs::write(&cfg, "[drain]\nperiod_ms = 500\ndeadline_ms = 10000\n").unwrap();
    let url = format!("http://{http}/v1/route");
    let mut a = EdgeProc::start(&[
        "--shards",
        "1",
        "--bus",
        &redis.url(),
        "--config",
        cfg.to_str().unwrap(),
        "--dispatch-url",
        &url,
    ]);
    let out = dir.join("out");
    let mut lg = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &a.ws.to_string(), "--http", &a.http.to_string()])
        .args(["--connections", &MEMBERS.to_string(), "--workers", "1", "--move-give-up", "2"])
        .args(["--duration", "6", "--gift-rate", "5", "--chat-rate", "0", "--gift-give-up", "1"])
        .args(["--scenario", "dispatch-refuses", "--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr.txt")).unwrap())
        .spawn()
        .expect("loadgen");
    drain_past(&mut lg, &mut a, 1.5);
    assert!(!lg.wait().unwrap().success(), "members given up fail the run");
    let _ = a.wait_exit(Duration::from_secs(60));
    let run = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap();
    // Dispatch's own count of the routes it refused.
    let mut s = TcpStream::connect(&http).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").unwrap();
    let mut metrics = String::new();
    s.read_to_string(&mut metrics).unwrap();
    let count = |outcome: &str| {
        let prefix = format!("roomcast_dispatch_answers_total{{outcome=\"{outcome}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)
    };
    let refused: u64 = ["reports_unavailable", "no_edge_reported", "none_eligible"].into_iter().map(count).sum();
    assert_eq!(count("routed"), 0, "{metrics}");
    assert_eq!(v["reconnect_failed"], MEMBERS, "every member's move was given up: {v}");
    assert!(refused > MEMBERS, "each member asked more than once: {refused}");
    assert_eq!(
        v["reconnect_attempts_failed_by_reason"],
        serde_json::json!({ "dispatch_http_503": refused }),
        "the generator's count is dispatch's: {v}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
