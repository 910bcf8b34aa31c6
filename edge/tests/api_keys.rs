//! Publish API keys, against the real binary: `Authorization: Bearer KEY` on
//! `POST /v1/rooms/{room}/messages` (401 without or with an unknown key, 403 outside the key's
//! rooms or kinds, each refusal counted), keys from `ROOMCAST_API_KEYS`, the GET endpoints left
//! open, and the start-up rule: no key is allowed only on a loopback address, or with
//! `ingest.insecure_no_keys`.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roomcast_proto::envelope::ServerMsg;
use roomcast_testsupport::*;
use serde_json::json;

const BACKEND: &str = "backend-0123456789abcdef";
const ROOMS_A: &str = "roomsa-0123456789abcdef";
const CHAT_ONLY: &str = "chatonly-0123456789abcdef";
const ADMIN: &str = "admin-0123456789abcdef";

/// The edge's stderr (its log), collected by a thread.
type Log = Arc<Mutex<String>>;

/// Starts the edge with exactly `args` and `env` (ROOMCAST_API_KEYS removed unless given),
/// collecting its stderr; panics with the log if it exits before it is ready.
fn spawn(args: &[&str], env: &[(&str, &str)]) -> (EdgeProc, Log) {
    let mut cmd = Command::new(edge_bin());
    cmd.args(args).arg("--no-store").env_remove("ROOMCAST_API_KEYS").env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn edge");
    let log = collect_stderr(&mut child);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("roomcast edge ready") => break l,
            Some(Ok(_)) => {}
            _ => {
                let st = child.wait();
                panic!("edge exited before it was ready ({st:?}): {}", log.lock().unwrap());
            }
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let field = |name: &str| -> SocketAddr {
        line.split_whitespace().find_map(|w| w.strip_prefix(name)).and_then(|v| v.parse().ok()).expect("address")
    };
    (EdgeProc { ws: field("ws="), http: field("http="), child, own_data: None }, log)
}

fn collect_stderr(child: &mut Child) -> Log {
    let log = Log::default();
    let mut err = child.stderr.take().expect("stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}

/// Runs the edge expecting it to exit by itself; returns its exit code and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(edge_bin())
        .args(args)
        .arg("--no-store")
        .env_remove("ROOMCAST_API_KEYS")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn edge");
    let log = collect_stderr(&mut child);
    let end = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code();
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the edge did not exit: {}", log.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(100)); // the reader thread's last bytes
    let text = log.lock().unwrap().clone();
    (code, text)
}

/// An API answer: status, `WWW-Authenticate`, body.
struct Answer {
    status: u16,
    challenge: Option<String>,
    body: serde_json::Value,
}

async fn post(http: SocketAddr, path: &str, auth: Option<&str>, body: serde_json::Value) -> Answer {
    let mut req = reqwest::Client::new().post(format!("http://{http}{path}")).body(body.to_string());
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let r = req.send().await.expect("http");
    let status = r.status().as_u16();
    let challenge = r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = r.text().await.unwrap_or_default();
    Answer { status, challenge, body: serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)) }
}

async fn publish(http: SocketAddr, room: &str, kind: &str, key: Option<&str>) -> Answer {
    let auth = key.map(|k| format!("Bearer {k}"));
    post(http, &format!("/v1/rooms/{room}/messages"), auth.as_deref(), json!({ "kind": kind, "body": {"n": 1} })).await
}

/// `roomcast_publish_rejected_total{reason="..."}`.
async fn rejected(http: SocketAddr, reason: &str) -> f64 {
    let (_, text) = Publisher::new(http).get("/metrics").await;
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("roomcast_publish_rejected_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn assert_refused(a: &Answer, status: u16, reason: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body["reason"], reason, "{}", a.body);
    assert!(a.body["error"].as_str().is_some_and(|e| !e.is_empty()), "{}", a.body);
    assert!(a.challenge.as_deref().is_some_and(|c| c.starts_with("Bearer")), "WWW-Authenticate: {:?}", a.challenge);
}

fn keyed_config(name: &str) -> String {
    config(
        name,
        &format!(
            "admin_token = \"{ADMIN}\"\n\
             [[ingest.keys]]\nname = \"backend\"\nkey = \"{BACKEND}\"\n\
             [[ingest.keys]]\nname = \"rooms-a\"\nkey_env = \"ROOMS_A_KEY\"\nrooms = [\"a*\"]\n\
             [[ingest.keys]]\nname = \"chat-only\"\nkey = \"{CHAT_ONLY}\"\nkinds = [\"chat\"]\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_guard_the_publish_api() {
    let cfg = keyed_config("keys");
    let args = ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "1", "--merge-window-ms", "0"];
    let (mut edge, _log) = spawn(&[&args[..], &["--config", &cfg]].concat(), &[("ROOMS_A_KEY", ROOMS_A)]);
    let http = edge.http;

    let mut ws = connect(&edge.url("?room=lobby"), None).await;
    expect_joined(&mut ws, "lobby").await;

    // No key, a malformed header, an unknown key: 401 with a challenge, nothing published.
    assert_refused(&publish(http, "lobby", "gift", None).await, 401, "no_key");
    let basic = post(http, "/v1/rooms/lobby/messages", Some("Basic YWxhZGRpbjpvcGVuc2VzYW1l"), json!({})).await;
    assert_refused(&basic, 401, "no_key");
    assert_refused(&publish(http, "lobby", "gift", Some("wrong-0123456789abcdef")).await, 401, "bad_key");
    assert_refused(&publish(http, "lobby", "gift", Some(&BACKEND[..BACKEND.len() - 1])).await, 401, "bad_key");
    // A refused caller learns nothing about the request's validity.
    assert_refused(&publish(http, "bad room", "gift", None).await, 401, "no_key");
    assert!(next_msg_within(&mut ws, Duration::from_millis(300)).await.is_none(), "nothing was published");

    // The right key: published and delivered.
    let ok = publish(http, "lobby", "gift", Some(BACKEND)).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let seq = ok.body["seq"].as_u64().expect("seq");
    match next_msg_within(&mut ws, Duration::from_secs(5)).await {
        Some(ServerMsg::Batch { room, messages, .. }) => {
            assert_eq!(room, "lobby");
            assert_eq!(messages.len(), 1);
            assert_eq!((messages[0].seq, messages[0].kind.as_str()), (seq, "gift"));
            assert_eq!(messages[0].body, r#"{"n":1}"#);
        }
        other => panic!("expected the batch, got {other:?}"),
    }

    // A key for rooms a*: refused on b (403), accepted on a1 and a.
    assert_refused(&publish(http, "b", "chat", Some(ROOMS_A)).await, 403, "key_room");
    assert_eq!(publish(http, "a1", "chat", Some(ROOMS_A)).await.status, 200);
    assert_eq!(publish(http, "a", "gift", Some(ROOMS_A)).await.status, 200);
    // A key for kind chat: refused for gift (403), accepted for chat.
    let gift = publish(http, "lobby", "gift", Some(CHAT_ONLY)).await;
    assert_refused(&gift, 403, "key_kind");
    assert!(gift.body["error"].as_str().unwrap().contains("chat-only"), "{}", gift.body);
    assert_eq!(publish(http, "lobby", "chat", Some(CHAT_ONLY)).await.status, 200);
    // Validation still answers 400 to a caller with a key.
    assert_eq!(publish(http, "bad room", "chat", Some(BACKEND)).await.status, 400);

    // Each refusal counted by reason.
    assert_eq!(rejected(http, "no_key").await, 3.0);
    assert_eq!(rejected(http, "bad_key").await, 2.0);
    assert_eq!(rejected(http, "key_room").await, 1.0);
    assert_eq!(rejected(http, "key_kind").await, 1.0);

    // The GET endpoints stay open.
    let p = Publisher::new(http);
    for path in ["/healthz", "/metrics", "/v1/rooms/lobby", "/v1/route?room=lobby", "/dashboard", "/v1/kernel"] {
        let (status, body) = p.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
    }

    // The admin token: wrong or missing -> 401 with a challenge; right -> the edge drains.
    for auth in [None, Some("Bearer admin-0123456789abcdeX".to_owned()), Some(format!("Bearer {BACKEND}"))] {
        let a = post(http, "/v1/admin/drain", auth.as_deref(), json!({})).await;
        assert_eq!(a.status, 401, "{}", a.body);
        assert!(a.challenge.is_some_and(|c| c.starts_with("Bearer")));
    }
    // It takes no parameters: one given is refused, not ignored (a trial's `?period_ms=abc`
    // started a drain on the config's schedule), and nothing starts.
    let a = post(http, "/v1/admin/drain?period_ms=60000", Some(&format!("Bearer {ADMIN}")), json!({})).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body["error"].as_str().is_some_and(|e| e.contains("takes no parameters")), "{}", a.body);
    let a = post(http, "/v1/admin/drain", Some(&format!("Bearer {ADMIN}")), json!({ "period_ms": 5 })).await;
    assert_eq!(a.status, 400, "a body is a parameter too: {}", a.body);
    // Every refusal counted by reason: three wrong tokens, two parameters.
    let (_, m) = p.get("/metrics").await;
    assert!(m.contains("roomcast_admin_refused_total{reason=\"unauthorized\"} 3"), "{m}");
    assert!(m.contains("roomcast_admin_refused_total{reason=\"parameters\"} 2"), "{m}");
    let (status, health) = p.get("/healthz").await;
    assert_eq!(status, 200, "not draining: {health}");
    assert!(health.contains("\"draining\":false"), "{health}");
    let a = post(http, "/v1/admin/drain", Some(&format!("Bearer {ADMIN}")), json!({})).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(edge.wait_exit(Duration::from_secs(30)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_the_environment() {
    let keys = format!("svc:{BACKEND}, ops:{CHAT_ONLY}");
    let (edge, log) = spawn(
        &["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "1"],
        &[("ROOMCAST_API_KEYS", keys.as_str())],
    );
    assert_refused(&publish(edge.http, "r", "gift", None).await, 401, "no_key");
    assert_refused(&publish(edge.http, "r", "gift", Some(ROOMS_A)).await, 401, "bad_key");
    // Unrestricted: any room, any kind.
    assert_eq!(publish(edge.http, "r", "gift", Some(BACKEND)).await.status, 200);
    assert_eq!(publish(edge.http, "zz", "gift", Some(CHAT_ONLY)).await.status, 200);
    let text = log.lock().unwrap().clone();
    assert!(!text.contains("has no keys"), "{text}");
    assert!(!text.contains(BACKEND) && !text.contains(CHAT_ONLY), "a key in the log: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_without_keys_is_open_and_says_so() {
    let (edge, log) = spawn(&["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "1"], &[]);
    let ok = publish(edge.http, "open", "gift", None).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // A header is ignored when there is nothing to check it against.
    assert_eq!(publish(edge.http, "open", "gift", Some("whatever")).await.status, 200);
    let text = log_when(&log, |t| t.contains("publish API has no keys")).await;
    assert_eq!(text.matches("publish API has no keys").count(), 1, "{text}");
    assert!(text.contains("WARN"), "{text}");
}

#[test]
fn public_address_without_keys_refuses_to_start() {
    let (code, err) = run_to_exit(&["--listen", "127.0.0.1:0", "--http", "0.0.0.0:0", "--shards", "1"]);
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {err}");
    assert!(err.contains("ingest.keys"), "{err}");
    assert!(err.contains("insecure_no_keys"), "{err}");
    // --check-config says the same.
    let (code, err) = run_to_exit(&["--http", "[::]:8081", "--check-config"]);
    assert!(code.is_some_and(|c| c != 0) && err.contains("ingest.keys"), "exit {code:?}: {err}");
    // A bad key names the setting and never quotes the key.
    let cfg = config("keys-bad", "[[ingest.keys]]\nname = \"x\"\nkey = \"tooshort\"\n");
    let (code, err) = run_to_exit(&["--config", &cfg, "--check-config"]);
    assert!(code.is_some_and(|c| c != 0) && err.contains("ingest.keys"), "exit {code:?}: {err}");
    assert!(!err.contains("tooshort"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_no_keys_starts_and_warns() {
    let cfg = config("keys-insecure", "[ingest]\ninsecure_no_keys = true\n");
    let (edge, log) =
        spawn(&["--listen", "127.0.0.1:0", "--http", "0.0.0.0:0", "--shards", "1", "--config", &cfg], &[]);
    assert!(edge.http.ip().is_unspecified(), "{}", edge.http);
    let http = SocketAddr::from(([127, 0, 0, 1], edge.http.port()));
    let ok = publish(http, "open", "gift", None).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let want = |t: &str| t.contains("WARN") && t.contains("INSECURE") && t.contains("insecure_no_keys");
    let text = log_when(&log, want).await;
    assert!(want(&text), "{text}");
}

/// The edge's log once `want` holds (at most 10 s): it is collected by a thread of its own,
/// and a single read can come before the line does (a full run caught one).
async fn log_when(log: &std::sync::Mutex<String>, want: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = log.lock().unwrap().clone();
        if want(&text) || std::time::Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_allow_a_public_address() {
    let cfg = keyed_config("keys-public");
    let (edge, log) = spawn(
        &["--listen", "127.0.0.1:0", "--http", "0.0.0.0:0", "--shards", "1", "--config", &cfg],
        &[("ROOMS_A_KEY", ROOMS_A)],
    );
    let http = SocketAddr::from(([127, 0, 0, 1], edge.http.port()));
    assert_refused(&publish(http, "r", "gift", None).await, 401, "no_key");
    assert_eq!(publish(http, "r", "gift", Some(BACKEND)).await.status, 200);
    let text = log.lock().unwrap().clone();
    assert!(!text.contains("publish API has no keys") && !text.contains("INSECURE"), "{text}");
    for k in [BACKEND, ROOMS_A, CHAT_ONLY, ADMIN] {
        assert!(!text.contains(k), "a key in the log: {text}");
    }
}
