//! The coordinator supervises its worker processes: a worker that dies is reported (which one,
//! how it ended) in the results, and a coordinator that is killed takes its workers with it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roomcast_testsupport::EdgeProc;

/// The processes whose parent is `pid` (from /proc/*/stat).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
        let rest = stat.rsplit_once(')').map_or("", |r| r.1);
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Whether `pid` is still a live process (a zombie waiting to be reaped is not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|r| r.1.split_whitespace().next().map(str::to_owned)))
        .is_some_and(|state| state != "Z" && state != "X")
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Starts `loadgen run` against `edge` with 2 workers of 200 connections each; returns it once
/// it prints its first publishing line (every worker connected), with its workers' pids.
fn start_run(edge: &EdgeProc, out: &std::path::Path, duration: &str) -> (Child, Vec<u32>) {
    let mut lg = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &edge.ws.to_string(), "--http", &edge.http.to_string()])
        .args(["--connections", "400", "--workers", "2", "--duration", duration])
        .args(["--gift-rate", "5", "--chat-rate", "10", "--scenario", "supervision"])
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("loadgen");
    let mut lines = BufReader::new(lg.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("t=") {
            break;
        }
    }
    // Keep reading (and printing) the rest so the coordinator never blocks on a full pipe.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| println!("{l}")));
    let workers = children(lg.id());
    assert_eq!(workers.len(), 2, "two worker processes under the coordinator");
    (lg, workers)
}

/// Runs `loadgen run` (`duration` s) against a new edge and sends `sig` to its worker
/// `which` once every member connected; checks the run failed (a run that lost a worker does
/// not exit 0) and returns its results folder, the run's folder in it, its result.json and the
/// worker's pid.
fn run_signalling_a_worker(
    name: &str,
    duration: &str,
    which: usize,
    sig: &str,
) -> (std::path::PathBuf, std::path::PathBuf, serde_json::Value, u32) {
    let mut edge = EdgeProc::start(&["--shards", "2"]);
    let out = roomcast_testsupport::scratch().join(format!("loadgen-{name}-{}", std::process::id()));
    let (mut lg, workers) = start_run(&edge, &out, duration);
    signal(workers[which], sig);
    let status = lg.wait().unwrap();
    let _ = Command::new("kill").args(["-INT", &edge.child.id().to_string()]).status();
    let _ = edge.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "a run that lost a worker does not exit 0");
    let dir = std::fs::read_dir(&out).unwrap().next().expect("results written").unwrap().path();
    let v = serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    (out, dir, v, workers[which])
}

/// A worker killed in the middle of a run is reported: the run still writes its results,
/// naming the dead worker and how it ended, counts the survivor's members, and exits with an
/// error because the results are not whole.
#[test]
fn a_worker_killed_mid_run_is_reported_in_the_results() {
    let (out, dir, v, _) = run_signalling_a_worker("supervision", "4", 0, "-KILL");
    let died = v["workers_died"].as_array().unwrap();
    assert_eq!(died.len(), 1, "{v}");
    assert_eq!(died[0]["status"], "signal 9", "{v}");
    assert_eq!(died[0]["count"], 200, "{v}");
    assert_eq!(died[0]["connected"], 200, "it held its connections when it died: {v}");
    assert_eq!(v["connections"], 200, "the survivor's members: {v}");
    assert_eq!(v["lost"]["gift"], 0, "the survivor lost nothing: {v}");
    // The per-second samples (and the lines printed from them) stop counting the dead worker's
    // members once it is reported: they are neither connected nor open.
    let last = v["samples"].as_array().unwrap().last().cloned().expect("samples");
    assert_eq!(last["connected"], 200, "the last sample counts the survivor only: {last}");
    assert_eq!(last["open"], 200, "the last sample counts the survivor only: {last}");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(readme.contains("| workers died (their connections) | worker "), "{readme}");
    let _ = std::fs::remove_dir_all(&out);
}

/// A worker that stops saying anything (stopped here with SIGSTOP: as the 67 workers of a 10^6
/// run stalled under the kernel's TCP memory pressure) is killed 90 s after its last report and
/// reported as dead; the run still writes the others' results. Before, the run ended with
/// "workers neither reported nor died within 90 s" and wrote nothing.
#[test]
fn a_worker_that_goes_silent_is_killed_and_the_results_are_written() {
    let (out, _, v, worker) = run_signalling_a_worker("silent", "3", 1, "-STOP");
    assert!(!alive(worker), "the silent worker was killed");
    let died = v["workers_died"].as_array().unwrap();
    assert_eq!(died.len(), 1, "{v}");
    assert_eq!(died[0]["id"], 1, "{v}");
    assert!(died[0]["status"].as_str().unwrap().contains("said nothing for 90 s"), "{v}");
    assert_eq!(v["connections"], 200, "the survivor's members: {v}");
    assert_eq!(v["lost"]["gift"], 0, "the survivor lost nothing: {v}");
    let _ = std::fs::remove_dir_all(&out);
}

/// A coordinator stopped with SIGTERM (no handler: the default action ends it at once) leaves
/// no worker behind while its members are still inside their upgrade: the server here answers
/// one byte every 2 s, so no first upgrade ever completes. (Workers whose handshakes block, TLS
/// members' connects and moves, only end by the parent-death signal each worker is started with.)
#[test]
fn a_coordinator_killed_with_sigterm_leaves_no_worker() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                for b in b"HTTP/1.1 101 Switching Protocols, slowly".iter().cycle() {
                    if std::io::Write::write_all(&mut s, &[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(2));
                }
            });
        }
    });
    let out = roomcast_testsupport::scratch().join(format!("loadgen-sigterm-{}", std::process::id()));
    let mut lg = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &addr, "--http", &addr, "--connections", "2", "--workers", "2"])
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .expect("loadgen");
    // Both workers are inside their first handshake.
    let until = Instant::now() + Duration::from_secs(60);
    while accepted.load(std::sync::atomic::Ordering::SeqCst) < 2 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let workers = children(lg.id());
    assert_eq!(workers.len(), 2, "two worker processes under the coordinator");
    signal(lg.id(), "-TERM");
    let _ = lg.wait();
    let until = Instant::now() + Duration::from_secs(30);
    while workers.iter().any(|&w| alive(w)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = workers.iter().copied().filter(|&w| alive(w)).collect();
    for &w in &left {
        let _ = Command::new("kill").args(["-KILL", &w.to_string()]).status();
    }
    let _ = std::fs::remove_dir_all(&out);
    assert!(left.is_empty(), "workers left running after the coordinator died: {left:?}");
}

/// `loadgen run` of 30 members over `workers` workers, all to a port nothing listens on (every
/// connect refused), asked to publish for 30 s, into `out`, under RUST_BACKTRACE=1 (as on this
/// box); its output.
fn run_refused(out: &std::path::Path, workers: &str) -> std::process::Output {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &format!("127.0.0.1:{port}"), "--http", &format!("127.0.0.1:{port}")])
        .args(["--connections", "30", "--workers", workers, "--duration", "30", "--out", out.to_str().unwrap()])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("loadgen")
}

/// Connections that fail are counted by reason, in the connect phase's lines: nothing listens
/// on the port, so every attempt is refused. With no member connected the run cannot measure
/// anything: it stops after the connect phase instead of publishing to nobody for its 30 s,
/// writes its results saying so, and exits non-zero.
#[test]
fn a_run_with_no_member_connected_stops_early_and_fails() {
    let out = roomcast_testsupport::scratch().join(format!("loadgen-refused-{}", std::process::id()));
    let o = run_refused(&out, "2");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stdout.contains("connected 0 (failed 30: refused: 30)"), "{stdout}");
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("Error: no member connected (30 failed: refused: 30)"), "{stderr}");
    let dir = std::fs::read_dir(&out).unwrap().next().expect("results written").unwrap().path();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(v["stopped_early"], "no member connected in the connect phase: nothing was published", "{v}");
    assert_eq!(v["publish_offered"]["gift"], 0, "nothing published to nobody: {v}");
    assert_eq!(v["publish_refused"], 0, "{v}");
    let _ = std::fs::remove_dir_all(&out);
}

/// Each worker's stderr reaches ours through the coordinator, a whole line at a time, prefixed
/// with its worker (`w2: `): lines from several workers no longer interleave mid-line, and say
/// which worker spoke. Every line of the run's stderr is a worker's so prefixed, or the
/// coordinator's own (`loadgen: `, its publishing streams' `publish `, `Error: `).
#[test]
fn worker_lines_come_whole_and_prefixed_with_their_worker() {
    let out = roomcast_testsupport::scratch().join(format!("loadgen-prefixed-{}", std::process::id()));
    let o = run_refused(&out, "3");
    let _ = std::fs::remove_dir_all(&out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    for line in stderr.lines() {
        let worker = line.strip_prefix('w').and_then(|l| l.split_once(": ")).map(|(n, _)| n.parse::<usize>());
        assert!(
            matches!(worker, Some(Ok(0..=2)))
                || ["loadgen: ", "publish ", "Error: "].iter().any(|p| line.starts_with(p)),
            "a line neither a worker's nor the coordinator's: {line:?} in {stderr}"
        );
    }
    // Each worker's first failure, told once with its connection (global index) and reason.
    for (w, conn) in [(0, 0), (1, 10), (2, 20)] {
        let first = format!("w{w}: connection {conn} failed (refused): ");
        assert_eq!(stderr.lines().filter(|l| l.starts_with(&first)).count(), 1, "{first:?} in {stderr}");
    }
}

/// Expected errors (a run that failed, a key refused) print their message, causes included,
/// on one `Error: ` line, with no backtrace even under RUST_BACKTRACE=1; the exit status is 1.
#[test]
fn expected_errors_print_no_backtrace() {
    let out = roomcast_testsupport::scratch().join(format!("loadgen-expected-error-{}", std::process::id()));
    let o = run_refused(&out, "1");
    let _ = std::fs::remove_dir_all(&out);
    let key = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", "127.0.0.1:9", "--http", "127.0.0.1:9", "--api-key-file", "/nonexistent/key"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("loadgen");
    for o in [o, key] {
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
        let last = stderr.lines().last().unwrap_or("");
        assert!(last.starts_with("Error: "), "the error, on the last line: {stderr}");
        assert_eq!(stderr.lines().filter(|l| l.starts_with("Error: ")).count(), 1, "{stderr}");
    }
}
