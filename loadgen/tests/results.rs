//! Where a run's results go: `<out>/<date>-<scenario>/`. A second run of one scenario on one
//! day overwrote the first's results there without a word; it is refused at its start (before
//! any connection: a long run is not wasted) naming the folder and `--replace`, which replaces
//! them and says so once. Files in the folder that are not the generator's (a script's logs)
//! do not count as results and are left alone.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use roomcast_testsupport::EdgeProc;

/// `loadgen run` of 10 members on `ws`, gifts 5/s for 1 s to `http`, scenario `again` under
/// `out`, with `extra` flags.
fn run(out: &Path, ws: &str, http: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", ws, "--http", http, "--connections", "10", "--workers", "1"])
        .args(["--duration", "1", "--gift-rate", "5", "--chat-rate", "0", "--scenario", "again"])
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("loadgen")
}

#[test]
fn a_second_run_into_the_same_folder_is_refused_unless_it_replaces_the_first() {
    let mut edge = EdgeProc::start(&["--shards", "1"]);
    let (ws, http) = (edge.ws.to_string(), edge.http.to_string());
    let out = roomcast_testsupport::scratch().join(format!("loadgen-results-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let date = String::from_utf8(Command::new("date").arg("+%Y-%m-%d").output().unwrap().stdout).unwrap();
    let folder = out.join(format!("{}-again", date.trim()));
    // A script's file in the folder before the first run is not a run's results.
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("edge.log"), "the script's\n").unwrap();

    let o = run(&out, &ws, &http, &["--note", "first"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = std::fs::read_to_string(folder.join("result.json")).unwrap();
    assert!(first.contains("\"note\": \"first\""), "{first}");

    // The same scenario again, to a --ws that records any connection: refused before one.
    let watch = TcpListener::bind("127.0.0.1:0").unwrap();
    let o = run(&out, &watch.local_addr().unwrap().to_string(), &http, &["--note", "second"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("Error: {} holds an earlier run's results (result.json, README.md", folder.display()))
            && stderr.contains("pass --replace to replace them"),
        "{stderr}"
    );
    watch.set_nonblocking(true).unwrap();
    assert!(watch.accept().is_err(), "no member connected before the refusal");
    assert_eq!(std::fs::read_to_string(folder.join("result.json")).unwrap(), first, "the first run's results kept");

    // With --replace: said once, and the results are the new run's.
    let o = run(&out, &ws, &http, &["--note", "third", "--replace"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(stderr.matches("--replace").count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "loadgen: --replace: this run's results will replace the earlier run's in {}",
            folder.display()
        )),
        "{stderr}"
    );
    let third = std::fs::read_to_string(folder.join("result.json")).unwrap();
    assert!(third.contains("\"note\": \"third\""), "{third}");
    assert_eq!(std::fs::read_to_string(folder.join("edge.log")).unwrap(), "the script's\n");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1, "one folder");

    let _ = Command::new("kill").args(["-INT", &edge.child.id().to_string()]).status();
    let _ = edge.wait_exit(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&out);
}
