//! The publisher against real endpoints: an edge with publish keys (the key given through
//! `ROOMCAST_API_KEY` or `--api-key-file`, never shown, to `run` and `pubbench` alike; an empty
//! one refused), publishes refused for good (the run stops early), and a publish endpoint that
//! refuses every connection (its errors told in a few lines, not one per retry; no early stop).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use roomcast_testsupport::EdgeProc;

const KEY: &str = "loadgen-test-key-0123456789abcdef";

/// Stops an edge as an operator's Ctrl-C would, and waits for it.
fn stop(e: &mut EdgeProc) {
    let _ = Command::new("kill").args(["-INT", &e.child.id().to_string()]).status();
    let _ = e.wait_exit(Duration::from_secs(30));
}

/// `loadgen run` of 20 members on `ws`, publishing gifts at 5/s for `secs` s to `http`, into
/// `dir`/out, with `extra` flags and `env` (`ROOMCAST_API_KEY` removed unless given).
fn run(dir: &Path, ws: &str, http: &str, secs: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.args(["run", "--ws", ws, "--http", http, "--connections", "20", "--workers", "1"])
        .args(["--duration", secs, "--gift-rate", "5", "--chat-rate", "0", "--scenario", "publish"])
        .arg("--out")
        .arg(dir.join("out"))
        .args(extra)
        .env_remove("ROOMCAST_API_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("loadgen")
}

/// The run's folder under `dir`/out (the only one), and its result.json.
fn result(dir: &Path) -> (PathBuf, serde_json::Value) {
    let run = std::fs::read_dir(dir.join("out")).unwrap().next().expect("results written").unwrap().path();
    let v = serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap();
    (run, v)
}

/// Every byte loadgen printed or wrote for a run: stdout, stderr and its result files.
fn everything(o: &Output, run: &Path) -> String {
    let mut all = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    for f in std::fs::read_dir(run).unwrap().flatten() {
        all += &String::from_utf8_lossy(&std::fs::read(f.path()).unwrap());
    }
    all
}

/// An edge with a publish key answers 401 to publishes without it: the run fails naming the
/// 401 and where a key goes. Given the key in `ROOMCAST_API_KEY` or in a file
/// (`--api-key-file`), every gift is published and reaches every member; the results record
/// where the key came from, and nothing loadgen printed or wrote holds the key.
#[test]
fn an_edge_with_publish_keys_gets_the_key_from_the_environment_or_a_file() {
    let cfg = roomcast_testsupport::config(
        "loadgen-keys",
        &format!("[[ingest.keys]]\nname = \"loadgen\"\nkey = \"{KEY}\"\n"),
    );
    let mut edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let (ws, http) = (edge.ws.to_string(), edge.http.to_string());
    let base = roomcast_testsupport::scratch().join(format!("loadgen-publish-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);

    let dir = base.join("none");
    let o = run(&dir, &ws, &http, "2", &[], &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "publishes refused 401 fail the run: {stderr}");
    assert!(stderr.contains("publishes refused for good (gift 401: "), "{stderr}");
    assert!(
        stderr.contains("ROOMCAST_API_KEY") && stderr.contains("--api-key-file"),
        "says where a key goes: {stderr}"
    );
    // Each of the 10 gifts is given up on its 401, told in a digest (the first at once, what
    // followed at the end), not in a line per gift.
    let told: Vec<&str> = stderr.lines().filter(|l| l.starts_with("publish gift ")).collect();
    assert!(told.len() <= 3, "a few lines, not one per gift: {told:#?}");
    assert!(told.first().is_some_and(|l| l.contains("answered 401")), "{told:#?}");
    let (_, v) = result(&dir);
    assert_eq!(v["publish_refused_by_status"]["gift 401"], 10, "every refusal still counted: {v}");
    assert_eq!(v["published"]["gift"], 0, "{v}");
    assert_eq!(v["publish_api_key"], serde_json::Value::Null, "{v}");

    let dir = base.join("env");
    let o = run(&dir, &ws, &http, "2", &[], &[("ROOMCAST_API_KEY", KEY)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (run_dir, v) = result(&dir);
    assert_eq!(v["published"]["gift"], 10, "{v}");
    assert_eq!(v["publish_refused"], 0, "{v}");
    assert_eq!(v["lost"]["gift"], 0, "{v}");
    assert_eq!(v["deliveries"], 20 * 10, "every member got every gift: {v}");
    assert_eq!(v["publish_api_key"], "ROOMCAST_API_KEY", "{v}");
    assert!(!everything(&o, &run_dir).contains(KEY), "the key is never printed nor written");

    let dir = base.join("file");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("publish.key");
    std::fs::write(&file, format!("{KEY}\n")).unwrap();
    // The file wins over a wrong key in the environment.
    let o = run(
        &dir,
        &ws,
        &http,
        "2",
        &["--api-key-file", file.to_str().unwrap()],
        &[("ROOMCAST_API_KEY", "not-the-key-0123456789")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (run_dir, v) = result(&dir);
    assert_eq!(v["published"]["gift"], 10, "{v}");
    assert_eq!(v["deliveries"], 20 * 10, "{v}");
    assert_eq!(v["publish_api_key"], format!("--api-key-file {}", file.display()), "{v}");
    assert!(!everything(&o, &run_dir).contains(KEY), "the key is never printed nor written");

    stop(&mut edge);
    let _ = std::fs::remove_dir_all(&base);
}

/// A publish endpoint refusing every connection for 6 s, a gift retried every 50 ms all that
/// time (~120 failed attempts): stderr tells it in a handful of lines (the first error, a
/// summary after 5 s, the gift given up, what was left untold at the end), where it printed one
/// line per attempt; result.json still counts every failed attempt.
#[test]
fn an_unreachable_publish_endpoint_is_told_in_a_few_lines() {
    let mut edge = EdgeProc::start(&["--shards", "1"]);
    // A port nothing listens on: connects are refused at once.
    let refusing = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let dir = roomcast_testsupport::scratch().join(format!("loadgen-publish-outage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = run(&dir, &edge.ws.to_string(), &refusing, "6", &["--gift-give-up", "6"], &[]);
    stop(&mut edge);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("publish")).collect();
    assert!(lines.len() <= 6, "{} lines about publishing: {stderr}", lines.len());
    assert!(lines[0].starts_with("publish gift stream 0: error (retrying): "), "{stderr}");
    assert!(lines.iter().any(|l| l.contains(" more errors (retrying) in the last 5 s")), "a summary: {stderr}");
    let (_, v) = result(&dir);
    let errors = v["publish_refused_by_status"]["gift error"].as_u64().unwrap_or(0);
    assert!(errors >= 50, "every failed attempt is counted: {v}");
    assert_eq!(v["publish_gave_up"]["gift"], 1, "{v}");
    // An endpoint that does not answer may be an edge restarting: not a reason to stop early.
    assert_eq!(v["stopped_early"], serde_json::Value::Null, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An edge with a publish key, a run without it asked to publish for 60 s: every gift is
/// refused 401, so the run stops a few seconds in rather than being refused for its whole
/// duration, writes its results saying why, and exits non-zero.
#[test]
fn publishes_refused_for_good_stop_the_run_early() {
    let cfg = roomcast_testsupport::config(
        "loadgen-keys-early",
        &format!("[[ingest.keys]]\nname = \"loadgen\"\nkey = \"{KEY}\"\n"),
    );
    let mut edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let dir = roomcast_testsupport::scratch().join(format!("loadgen-publish-early-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = run(&dir, &edge.ws.to_string(), &edge.http.to_string(), "60", &[], &[]);
    stop(&mut edge);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("publishes refused for good (gift 401: "), "{stderr}");
    assert!(
        stderr.contains("loadgen: stopping early: stopped publishing at ")
            && stderr.contains(" s of 60 s: publish gift stream 0: every answer for "),
        "{stderr}"
    );
    let (_, v) = result(&dir);
    let why = v["stopped_early"].as_str().expect("stopped_early");
    assert!(why.ends_with(" answered 401)"), "{v}");
    let offered = v["publish_offered"]["gift"].as_u64().unwrap();
    assert!(offered < 60 * 5 / 2, "stopped long before its 300 gifts: {v}");
    assert_eq!(v["publish_refused_by_status"]["gift 401"], offered, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An empty `ROOMCAST_API_KEY` (a script's `ROOMCAST_API_KEY=$KEY` with KEY unset) is refused
/// at once, by `run` and `pubbench`, naming the variable, before any member connects: it meant
/// publishing without a key.
#[test]
fn an_empty_key_variable_is_refused() {
    let dir = roomcast_testsupport::scratch().join(format!("loadgen-emptykey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = run(&dir, "127.0.0.1:9", "127.0.0.1:9", "1", &[], &[("ROOMCAST_API_KEY", "")]);
    let pb = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["pubbench", "--http", "127.0.0.1:9", "--duration", "1"])
        .env("ROOMCAST_API_KEY", " ")
        .output()
        .expect("loadgen");
    for o in [o, pb] {
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{stderr}");
        assert!(stderr.contains("Error: ROOMCAST_API_KEY is set but empty or blank"), "{stderr}");
    }
    assert!(!dir.join("out").exists(), "refused before the run started");
}

/// `loadgen pubbench` against an edge with a publish key: without it every publish is answered
/// 401 and stderr says where a key goes; given it in `ROOMCAST_API_KEY` or `--api-key-file`,
/// publishes are accepted. The result records where the key came from, never the key.
#[test]
fn pubbench_takes_the_key_from_the_environment_or_a_file() {
    let cfg = roomcast_testsupport::config(
        "loadgen-pubbench-keys",
        &format!("[[ingest.keys]]\nname = \"loadgen\"\nkey = \"{KEY}\"\n"),
    );
    let mut edge = EdgeProc::start(&["--shards", "1", "--config", &cfg]);
    let dir = roomcast_testsupport::scratch().join(format!("loadgen-pubbench-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("publish.key");
    std::fs::write(&file, format!("{KEY}\n")).unwrap();
    let pubbench = |extra: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
        cmd.args(["pubbench", "--http", &edge.http.to_string(), "--concurrency", "2"])
            .args(["--duration", "1", "--warmup", "0.2"])
            .args(extra)
            .env_remove("ROOMCAST_API_KEY");
        if let Some(k) = env {
            cmd.env("ROOMCAST_API_KEY", k);
        }
        let o = cmd.output().expect("loadgen");
        let all = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{all}");
        assert!(!all.contains(KEY), "the key is never printed: {all}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("the result");
        (v, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (v, stderr) = pubbench(&[], None);
    assert_eq!(v["accepted"], 0, "{v}");
    assert!(v["other_answers"]["401"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(stderr.contains("ROOMCAST_API_KEY") && stderr.contains("--api-key-file"), "{stderr}");
    let (v, _) = pubbench(&[], Some(KEY));
    assert!(v["accepted"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["other_answers"], serde_json::json!({}), "{v}");
    assert_eq!(v["publish_api_key"], "ROOMCAST_API_KEY", "{v}");
    let (v, _) = pubbench(&["--api-key-file", file.to_str().unwrap()], None);
    assert!(v["accepted"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["publish_api_key"], format!("--api-key-file {}", file.display()), "{v}");
    stop(&mut edge);
    let _ = std::fs::remove_dir_all(&dir);
}
