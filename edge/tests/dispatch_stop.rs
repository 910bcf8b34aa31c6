//! `edge dispatch` stops on SIGINT and SIGTERM even when started as a script's background job,
//! which begins with SIGINT ignored (found by bench-drain.sh: its cleanup's SIGINT left the
//! dispatch process running).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roomcast_testsupport::*;

fn stops_on(signal: &str) {
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
    stops_on("-INT");
}

#[test]
fn dispatch_stops_on_sigterm() {
    stops_on("-TERM");
}
