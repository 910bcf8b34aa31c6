//! `reset` messages the members get are counted, per type beside `gap`s (result.json's
//! `gaps_and_resets`, the per-second lines, the summary): Redis emptied under an edge restarts
//! its rooms' numbering, and every live member gets a `reset` (docs/PROTOCOL.md, Epochs), over
//! WebSocket in both encodings and over event streams alike. The generator read past them.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use roomcast_testsupport::{EdgeProc, RedisProc};

/// FLUSHALL, as an operator emptying Redis would.
fn flushall(port: u16) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"FLUSHALL\r\n").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"+OK\r\n");
}

#[test]
fn resets_are_counted_over_websocket_and_event_streams() {
    const MEMBERS: u64 = 20;
    for (name, extra) in [("rkyv", &[][..]), ("json", &["--json"][..]), ("sse", &["--sse"][..])] {
        let redis = RedisProc::start();
        let mut edge = EdgeProc::start(&["--shards", "1", "--bus", &redis.url()]);
        let dir = roomcast_testsupport::scratch().join(format!("loadgen-resets-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut lg = Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["run", "--ws", &edge.ws.to_string(), "--http", &edge.http.to_string()])
            .args(["--connections", &MEMBERS.to_string(), "--workers", "1", "--duration", "4"])
            .args(["--gift-rate", "5", "--chat-rate", "0", "--scenario", name, "--out", dir.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("loadgen");
        let (mut flushed, mut last_line, mut stdout) = (false, String::new(), String::new());
        for line in BufReader::new(lg.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("t=") {
                let t: f64 = rest.split('s').next().unwrap().trim().parse().unwrap();
                if !flushed && t >= 1.5 {
                    flushall(redis.port);
                    flushed = true;
                }
                last_line.clone_from(&line);
            }
            stdout += &line;
            stdout += "\n";
        }
        let status = lg.wait().unwrap();
        let _ = Command::new("kill").args(["-INT", &edge.child.id().to_string()]).status();
        let _ = edge.wait_exit(Duration::from_secs(30));
        assert!(flushed, "{name}: the run reached the flush: {stdout}");
        let run = std::fs::read_dir(&dir).unwrap().next().expect("results written").unwrap().path();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap();
        assert!(status.success(), "{name}: {v}");
        assert_eq!(
            v["gaps_and_resets"],
            serde_json::json!({ "gap": 0, "reset": MEMBERS }),
            "{name}: every member reset once, no gap: {v}"
        );
        assert_eq!(v["lost"]["gift"], 0, "{name}: {v}");
        assert!(last_line.ends_with(&format!(" gaps=0 resets={MEMBERS}")), "{name}: {last_line}");
        assert!(stdout.contains("\"gaps_and_resets\": {"), "{name}: in the summary: {stdout}");
        let readme = std::fs::read_to_string(run.join("README.md")).unwrap();
        assert!(
            readme.contains(&format!("| gap / reset messages received (seqs the gaps named) | 0 / {MEMBERS} (0) |")),
            "{name}: {readme}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
