//! Flags the binary refuses up front, naming the flag (clap's usage error, exit status 2), and
//! defaults derived from other flags.

use std::process::{Command, Output};
use std::time::Duration;

use roomcast_testsupport::EdgeProc;

/// `loadgen run` with `extra` flags, against addresses nothing listens on: a refused flag
/// stops it before it connects anywhere.
fn run_with(extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", "127.0.0.1:9", "--http", "127.0.0.1:9"])
        .args(extra)
        .output()
        .expect("loadgen")
}

/// A negative number given to a numeric flag (`--connections -5`) gets that flag's own error,
/// `invalid value '-5' for '--connections <N>': ...`, with its usage exit status (2); clap took
/// `-5` for a flag of its own and said only "unexpected argument '-5' found".
#[test]
fn negative_numbers_get_the_flags_own_error() {
    let cases: &[(&str, &str)] = &[
        ("--connections", "-5"),
        ("--ramp", "-1"),
        ("--duration", "-1"),
        ("--rooms", "-1"),
        ("--workers", "-2"),
        ("--gift-rate", "-0.5"),
        ("--chat-rate", "-1"),
        ("--pad", "-1"),
        ("--connect-inflight", "-1"),
        ("--gift-give-up", "-1"),
        ("--move-give-up", "-1"),
        ("--connect-deadline", "-3"),
        ("--allow-connect-failures", "-1"),
        ("--allow-connect-failures", "-1%"),
    ];
    for &(flag, value) in cases {
        let o = run_with(&[flag, value]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(&format!("invalid value '{value}' for '{flag} <")), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("unexpected argument"), "{flag} {value}: {stderr}");
    }
    // The other subcommands' numbers alike.
    for (args, flag) in [
        (&["pubbench", "--http", "127.0.0.1:9", "--concurrency", "-4"][..], "--concurrency"),
        (&["pubbench", "--http", "127.0.0.1:9", "--duration", "-1"][..], "--duration"),
        (&["tokens", "--alg", "hs256", "--out", "/dev/null", "--count", "-3"][..], "--count"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args).output().expect("loadgen");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("for '{flag} <")), "{args:?}: {stderr}");
    }
}

/// A padding no edge would take (`--pad 99999999999`) is a usage error naming the flag; a
/// trial's aborted the generator on the allocation (SIGABRT, exit 134).
#[test]
fn a_pad_past_16_mib_is_refused() {
    let o = run_with(&["--pad", "99999999999"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid value '99999999999' for '--pad <"), "{stderr}");
    assert_eq!(run_with(&["--pad", "16777217"]).status.code(), Some(2));
}

/// `--connect-deadline 0` gave the connect phase no time at all: it was accepted and the run
/// failed at once reporting a count taken before any worker had said anything. It is refused,
/// naming the flag and what it takes.
#[test]
fn a_connect_deadline_of_zero_is_refused() {
    for zero in ["0", "0.0"] {
        let o = run_with(&["--connect-deadline", zero]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(&format!("invalid value '{zero}' for '--connect-deadline <SECS>'")), "{stderr}");
        assert!(stderr.contains("above 0"), "{stderr}");
    }
}

/// `--ramp 0` (no pacing) made the default connect deadline connections / 0 = infinity,
/// clamped to 10^9 s (31 years): a connect phase that stalled never ended. Unpaced, the default
/// is the one a 1,000/s ramp gets (twice its time plus 30 s: 30.04 s for 20 members), and the
/// results say which deadline the run had.
#[test]
fn an_unpaced_ramp_gets_a_finite_connect_deadline() {
    let mut edge = EdgeProc::start(&["--shards", "1"]);
    let out = roomcast_testsupport::scratch().join(format!("loadgen-ramp0-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &edge.ws.to_string(), "--http", &edge.http.to_string()])
        .args(["--connections", "20", "--workers", "1", "--ramp", "0", "--duration", "1"])
        .args(["--gift-rate", "5", "--chat-rate", "0", "--scenario", "ramp0", "--out", out.to_str().unwrap()])
        .output()
        .expect("loadgen");
    let _ = Command::new("kill").args(["-INT", &edge.child.id().to_string()]).status();
    let _ = edge.wait_exit(Duration::from_secs(30));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(v["connections"], 20, "{v}");
    let deadline = v["connect_deadline_s"].as_f64().expect("connect_deadline_s in the results");
    assert!((deadline - 30.04).abs() < 1e-9, "{deadline}");
    let _ = std::fs::remove_dir_all(&out);
}

/// A zero (or a value past what the flag can mean) that made a run meaningless was taken
/// silently: `--rooms 0`, `--gift-streams 0`, `--src-addrs 0`, `--connect-inflight 0` and
/// `--chat-batch 0` were quietly run as 1, `--slow-bytes 0` made slow readers that never read,
/// `--duration 0` published nothing, a `--server-pid` with no process behind it left every
/// server figure "not measured"; `pubbench`'s and `tokens`' zeros likewise (`--threads 0` ran
/// one thread, `--ttl 0` signed tokens expired when written). Each is refused as a usage error
/// naming the flag (exit status 2), before anything starts.
#[test]
fn values_that_make_a_run_meaningless_get_the_flags_own_error() {
    // A pid with no process: a child's, reaped.
    let mut gone = Command::new("true").spawn().expect("true");
    gone.wait().unwrap();
    let gone = gone.id().to_string();
    let run = |extra: &[&str]| {
        let mut a = vec!["run", "--ws", "127.0.0.1:9", "--http", "127.0.0.1:9"];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let other = |args: &[&str]| args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let mut cases: Vec<(Vec<String>, &str, &str)> = [
        ("--rooms", "0"),
        ("--gift-streams", "0"),
        ("--chat-streams", "0"),
        ("--chat-batch", "0"),
        ("--src-addrs", "0"),
        ("--src-addrs", "254"),
        ("--src-net", "10.0"),
        ("--src-net", "300.1.1"),
        ("--connect-inflight", "0"),
        ("--slow-bytes", "0"),
        ("--duration", "0"),
        ("--server-pid", "0"),
    ]
    .into_iter()
    .map(|(flag, value)| (run(&[flag, value]), flag, value))
    .collect();
    cases.push((run(&["--server-pid", &gone]), "--server-pid", &gone));
    let pubbench = |flag: &str, value: &str| other(&["pubbench", "--http", "127.0.0.1:9", flag, value]);
    for (flag, value) in [
        ("--rooms", "0"),
        ("--concurrency", "0"),
        ("--duration", "0"),
        ("--threads", "0"),
        ("--body-bytes", "7"),
        ("--server-pid", "0"),
    ] {
        cases.push((pubbench(flag, value), flag, value));
    }
    let tokens = |extra: &[&str]| other(&[&["tokens", "--alg", "hs256", "--out", "/dev/null"][..], extra].concat());
    cases.push((tokens(&["--count", "0"]), "--count", "0"));
    cases.push((tokens(&["--count", "3", "--ttl", "0"]), "--ttl", "0"));
    for (args, flag, value) in &cases {
        let o = Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args).output().expect("loadgen");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("invalid value '{value}' for '{flag} <")), "{args:?}: {stderr}");
    }
    // What zero does mean is still taken: no pacing, autotuned buffers, no slow readers,
    // workers by the connection count, gifts never given up (here a run that fails only for
    // having nowhere to connect, not for a flag; its results go to a folder of its own).
    let out = roomcast_testsupport::scratch().join(format!("loadgen-zeros-{}", std::process::id()));
    let o = run_with(&[
        "--connections",
        "5",
        "--ramp",
        "0",
        "--rcvbuf",
        "0",
        "--slow-every",
        "0",
        "--workers",
        "0",
        "--gift-give-up",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Error: no member connected"), "{stderr}");
}
