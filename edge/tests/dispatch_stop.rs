//! `edge dispatch` stops on SIGINT and SIGTERM even when started as a script's background job,
//! which begins with SIGINT ignored (found by bench-drain.sh: its cleanup's SIGINT left the
//! dispatch process running).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roomcast_testsupport::*;

fn stops_on(signal: &str, half_sent: bool) {
    let redis = RedisProc::start();
    // `trap '' INT` then exec: the dispatch process starts with SIGINT ignored, as a background
    // job of a non-interactive shell does.
    let mut child = Command::new("sh")
        .args(["-c", "trap '' INT; exec \"$0\" dispatch --redis \"$1\" --http 127.0.0.1:0"])
        .arg(edge_bin())
        .arg(redis.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("edge dispatch");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert!(line.contains("dispatch ready"), "{line}");
    // A client holding a request it never finishes must not keep the process alive.
    let _held = half_sent.then(|| {
        let addr = line.split_whitespace().find_map(|w| w.strip_prefix("http=")).expect("http=").to_owned();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut s, b"GET /v1/route?room=x HTTP/1.1\r\nHost: x\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        s
    });
    let ok = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{signal}: {status:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("edge dispatch still running 10 s after {signal}");
}

#[test]
fn dispatch_stops_on_sigint_even_when_started_ignoring_it() {
    stops_on("-INT", false);
}

#[test]
fn dispatch_stops_on_sigterm() {
    stops_on("-TERM", false);
}

/// Found by a new user's trial: with a half-sent request open, dispatch logged "stopping" and
/// stayed up as long as the client held it.
#[test]
fn dispatch_stops_within_its_grace_while_a_client_holds_a_half_sent_request() {
    stops_on("-TERM", true);
}
