//! A short real run: the edge binary (built by the same `cargo test --workspace`), 2,000
//! connections for a few seconds, zero loss, and a complete result file.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn edge_binary() -> PathBuf {
    // Integration tests live in target/<profile>/deps; the edge binary sits in target/<profile>.
    let me = std::env::current_exe().expect("test path");
    let profile_dir = me.parent().and_then(|p| p.parent()).expect("target/<profile>");
    let edge = profile_dir.join("edge");
    assert!(
        edge.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        edge.display()
    );
    edge
}

#[test]
fn two_thousand_connections_no_loss_and_a_complete_result() {
    let mut edge = Command::new(edge_binary())
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "2"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("edge");
    let mut line = String::new();
    BufReader::new(edge.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let field = |p: &str| line.split_whitespace().find_map(|w| w.strip_prefix(p)).expect("address").to_owned();
    let (ws, http) = (field("ws="), field("http="));
    let out = std::env::temp_dir().join(format!("loadgen-e2e-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &ws, "--http", &http, "--connections", "2000", "--workers", "2"])
        .args(["--duration", "3", "--gift-rate", "10", "--chat-rate", "50", "--scenario", "e2e"])
        .args(["--server-pid", &edge.id().to_string(), "--out", out.to_str().unwrap()])
        .status()
        .expect("loadgen");
    let _ = Command::new("kill").args(["-INT", &edge.id().to_string()]).status();
    let _ = edge.wait();
    assert!(status.success());
    let dir = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
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
    assert!(v["edge_rss_bytes_per_connection"].is_number());
    for f in ["README.md", "latency.svg", "throughput.svg"] {
        assert!(dir.join(f).metadata().unwrap().len() > 100, "{f}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
