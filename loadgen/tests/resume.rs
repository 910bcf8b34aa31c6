//! Where a member resumes after the edge closed it with 1013 (come back shortly): from the last
//! seq it saw once its `joined` gave it a position, and afresh (no `since`) before that. A
//! trial found members closed before their `joined` coming back with `since=0`, which asks for
//! the room's whole history: 360,300 duplicate gifts on a Redis holding earlier runs'.
//!
//! The edge here is a stand-in speaking WebSocket (tungstenite's server side), so the test can
//! close a member at exactly the point it means and read the URL the member comes back with.

use std::net::TcpListener;
use std::process::Command;
use std::sync::mpsc;

use tungstenite::Message;
use tungstenite::handshake::server::{Request, Response};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

/// Runs one member against a stand-in edge that answers its first connection with `joined`
/// at `seq` (if given) and then a 1013 close, and its next ones with `joined` at 50 and gift
/// number 5; returns the URL of each connection it made, and the run's result.json.
fn urls_after_a_1013(joined_at: Option<u64>) -> (Vec<String>, serde_json::Value) {
    let ws = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = ws.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in ws.incoming().enumerate() {
            let Ok(stream) = stream else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut uri = String::new();
                // tungstenite's callback type: its error is the HTTP answer to refuse with.
                #[allow(clippy::result_large_err)]
                let cb = |req: &Request, mut resp: Response| {
                    uri = req.uri().to_string();
                    // Agree to the encoding the member asks for, as the edge does.
                    if let Some(p) = req.headers().get("sec-websocket-protocol") {
                        let first = p.to_str().unwrap_or("").split(',').next().unwrap_or("").trim().to_owned();
                        resp.headers_mut().insert("sec-websocket-protocol", first.parse().unwrap());
                    }
                    Ok(resp)
                };
                let Ok(mut sock) = tungstenite::accept_hdr(stream, cb) else { return };
                let _ = tx.send(uri);
                if n == 0 {
                    if let Some(seq) = joined_at {
                        let joined = format!(r#"{{"type":"joined","room":"r0","seq":{seq},"epoch":"1"}}"#);
                        let _ = sock.send(Message::text(joined));
                    }
                    let why = CloseFrame { code: CloseCode::Again, reason: "cannot read this room now".into() };
                    let _ = sock.close(Some(why));
                } else {
                    let joined = r#"{"type":"joined","room":"r0","seq":50,"epoch":"1"}"#;
                    let _ = sock.send(Message::text(joined));
                    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
                    let gift = format!(
                        r#"{{"type":"batch","room":"r0","messages":[{{"seq":51,"ts_us":{t},"kind":"gift","user":"","body":{{"t":{t},"k":5,"kind":"gift"}}}}]}}"#
                    );
                    let _ = sock.send(Message::text(gift));
                }
                // Read until the member goes (answering its close; the later ones stay open).
                while sock.read().is_ok() {}
            });
        }
    });
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let out =
        roomcast_testsupport::scratch().join(format!("loadgen-resume-{}-{}", joined_at.is_some(), std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "--ws", &addr.to_string(), "--http", &dead.local_addr().unwrap().to_string()])
        .args(["--connections", "1", "--workers", "1", "--duration", "3", "--json"])
        .args(["--gift-rate", "0", "--chat-rate", "0", "--scenario", "resume", "--out", out.to_str().unwrap()])
        .output()
        .expect("loadgen");
    let result = std::fs::read_dir(&out)
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| std::fs::read_to_string(e.ok()?.path().join("result.json")).ok())
        .map(|s| serde_json::from_str(&s).unwrap());
    let _ = std::fs::remove_dir_all(&out);
    let urls: Vec<String> = rx.try_iter().collect();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(urls.len() >= 2, "the member came back: {urls:?}\n{stderr}");
    (urls, result.unwrap_or_else(|| panic!("results written:\n{stderr}")))
}

/// ... and, joined afresh, is owed what was published from its first message on: gift 5 as
/// its first says 0..5 were published before its join (a trial counted such gifts lost).
#[test]
fn a_member_closed_before_its_joined_comes_back_without_since() {
    let (urls, v) = urls_after_a_1013(None);
    assert!(!urls[0].contains("since="), "{urls:?}");
    assert!(urls[1].starts_with("/ws?room=r0"), "{urls:?}");
    assert!(!urls[1].contains("since="), "no position, no since (since=0 replays the whole history): {urls:?}");
    assert_eq!(v["fresh_starts"], 1, "{v}");
    assert_eq!(v["not_owed"]["gift"], 5, "{v}");
    assert_eq!(v["lost"]["gift"], 0, "{v}");
}

/// ... while one that had a position is owed every number after it: gift 5 as its first
/// message after `since` is a loss of 0..5.
#[test]
fn a_member_closed_after_its_joined_comes_back_with_since() {
    let (urls, v) = urls_after_a_1013(Some(41));
    assert!(urls[1].starts_with("/ws?room=r0"), "{urls:?}");
    assert!(urls[1].contains("since=41"), "resumes from the joined seq: {urls:?}");
    assert_eq!(v["fresh_starts"], 0, "{v}");
    assert_eq!(v["not_owed"]["gift"], 0, "{v}");
    assert_eq!(v["lost"]["gift"], 5, "{v}");
}
