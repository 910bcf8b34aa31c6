//! A second edge on a port another edge serves refuses to start and names it, unless
//! `--takeover` asks for a rolling restart.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use roomcast_testsupport::EdgeProc;

/// Starts another edge on `ws` with both outputs piped; lines arrive on the receivers.
fn second_edge(ws: std::net::SocketAddr, extra: &[&str]) -> (Child, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    second_edge_on(ws, "127.0.0.1:0", extra)
}

/// [`second_edge`] with its HTTP API on `http`.
fn second_edge_on(
    ws: std::net::SocketAddr,
    http: &str,
    extra: &[&str],
) -> (Child, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut child = Command::new(roomcast_testsupport::edge_bin())
        .args(["--listen", &ws.to_string(), "--http", http])
        // Its own data directory: the first edge holds the lock on its own.
        .arg("--data-dir")
        .arg(roomcast_testsupport::data_dir("takeover"))
        .args(extra)
        .env("RUST_LOG", "info")
        // As on the boxes we test on: an expected error must still be one line, no backtrace.
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn edge");
    let out = child_lines(child.stdout.take().expect("stdout"));
    let err = child_lines(child.stderr.take().expect("stderr"));
    (child, out, err)
}

/// Reads a pipe on a thread (so the child never blocks on it) and forwards its lines.
fn child_lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits up to 20 s for `child` to exit (killing it and panicking with `what` if it does not).
fn exit_status(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() >= deadline {
            kill(child);
            panic!("{what} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every line of an exited child's output (its pipe reaches end of file soon), at most 5 s.
fn all_lines(rx: &mpsc::Receiver<String>) -> String {
    let mut text = String::new();
    let end = Instant::now() + Duration::from_secs(5);
    while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

fn kill(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

#[test]
fn second_edge_refuses_the_port_unless_taking_over() {
    let mut first = EdgeProc::start(&["--shards", "1"]);
    let first_pid = first.child.id();

    // Without --takeover: exits non-zero and names the first edge.
    let (mut second, _out, err) = second_edge(first.ws, &["--shards", "1"]);
    let status = exit_status(&mut second, &format!("the second edge on {}", first.ws));
    assert!(!status.success(), "the second edge started on a port the first serves: {status:?}");
    let stderr = all_lines(&err);
    assert!(stderr.contains(&format!("pid {first_pid} (")), "stderr does not name pid {first_pid}:\n{stderr}");
    assert!(stderr.contains("--takeover"), "stderr does not mention --takeover:\n{stderr}");
    assert!(first.child.try_wait().expect("try_wait").is_none(), "the first edge stopped");

    // With --takeover: starts, sharing the port.
    let (mut third, out, _err) = second_edge(first.ws, &["--shards", "1", "--takeover"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match out.recv_timeout(Duration::from_millis(50)) {
            Ok(line) if line.starts_with("roomcast edge ready") => break,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = third.wait();
                panic!("the edge with --takeover exited before it was ready: {st:?}");
            }
        }
        if let Some(st) = third.try_wait().expect("try_wait") {
            panic!("the edge with --takeover exited before it was ready: {st:?}");
        }
        if Instant::now() >= deadline {
            kill(&mut third);
            panic!("the edge with --takeover was not ready within 20 s");
        }
    }
    kill(&mut third);
    assert!(first.child.try_wait().expect("try_wait").is_none(), "the first edge stopped");
}

/// A takeover started with the old edge's own `--http` (an in-place restart's first try): the
/// HTTP API's port is not shared, so the new edge exits naming who holds it and what to do,
/// before its shards join the WebSocket port (a trial got a bare "Address already in use").
#[test]
fn a_takeover_on_the_old_edges_http_port_names_its_holder_and_takes_no_connection() {
    let mut first = EdgeProc::start(&["--shards", "1"]);
    let first_pid = first.child.id();
    let (mut second, out, err) = second_edge_on(first.ws, &first.http.to_string(), &["--shards", "1", "--takeover"]);
    let status = exit_status(&mut second, "the takeover on the first edge's HTTP port");
    assert!(!status.success(), "the takeover started on a held HTTP port: {status:?}");
    let (stdout, stderr) = (all_lines(&out), all_lines(&err));
    assert!(
        stderr.contains(&format!("{} (http): the port is held by pid {first_pid} (", first.http)),
        "stderr does not name the HTTP port's holder, pid {first_pid}:\n{stderr}"
    );
    assert!(stderr.contains("its own --http port"), "stderr does not say what to do:\n{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace"), "an expected error printed a backtrace:\n{stderr}");
    // It failed before its shards listened: no shard took the WebSocket port's connections.
    assert!(!stderr.contains("taking over"), "the shards joined the WebSocket port first:\n{stderr}");
    assert!(!stdout.contains("ready"), "{stdout}");
    assert!(first.child.try_wait().expect("try_wait").is_none(), "the first edge stopped");
}

/// A supervisor restarting an edge at once after `kill -9`: the dead process's listening
/// sockets linger in the kernel for a few milliseconds while its io_uring is torn down, held by
/// no process. The new edge waits that out instead of refusing the port as held.
#[test]
fn a_restart_right_after_kill_9_gets_the_port() {
    for _ in 0..3 {
        let mut first = EdgeProc::start(&["--shards", "2"]);
        let ws = first.ws;
        first.kill9();
        let (mut again, out, err) = second_edge(ws, &["--shards", "2"]);
        let ready = out.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        let errs: Vec<String> = err.try_iter().collect();
        kill(&mut again);
        assert!(ready.starts_with("roomcast edge ready"), "{ready}\n{}", errs.join("\n"));
    }
}

/// An edge that cannot see the port's holder (no capabilities: the eBPF file iterator is
/// refused and a full-root process's /proc/[pid]/fd is unreadable) says so while it waits,
/// instead of calling a running edge "a listener no process owns (one being torn down)".
#[test]
fn an_edge_without_capabilities_says_it_cannot_name_the_holder() {
    let first = EdgeProc::start(&["--shards", "1"]);
    let mut second = Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(roomcast_testsupport::edge_bin())
        .args(["--listen", &first.ws.to_string(), "--http", "127.0.0.1:0", "--shards", "1"])
        .arg("--data-dir")
        .arg(roomcast_testsupport::data_dir("takeover-nocaps"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn setpriv (util-linux)");
    let err = child_lines(second.stderr.take().expect("stderr"));
    // The guard speaks after its first second of looking.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut lines = Vec::new();
    let warned = loop {
        match err.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains("listen_guard") && line.contains("WARN") => break line,
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break String::new(),
        }
        if Instant::now() >= deadline {
            break String::new();
        }
    };
    kill(&mut second);
    assert!(warned.contains("cannot name"), "no warning that the holder is unseen: {warned}\n{}", lines.join("\n"));
    assert!(warned.contains("no eBPF file iterator"), "{warned}");
    assert!(!warned.contains("no process owns"), "{warned}");
}
