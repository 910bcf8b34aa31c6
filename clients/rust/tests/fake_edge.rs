//! The client against a scripted edge (tokio-tungstenite server on 127.0.0.1:0): behaviour that a
//! real edge shows only rarely or slowly: a connection that goes silent, refused tokens, close
//! codes 4001 and 1013. (The real edge's drains and restarts: edge/tests/rust_client.rs.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use roomcast_client::{Backoff, Client, Config, ErrorEvent, Event, Events, TokenSource};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// What the fake edge saw of one upgrade request.
#[derive(Debug, Clone)]
struct Seen {
    uri: String,
    auth: Option<String>,
    at: Instant,
}

/// Accepts one upgrade: records it, refuses it with `refuse` if given, else echoes the JSON
/// subprotocol.
#[expect(clippy::result_large_err, reason = "the handshake callback's signature is tungstenite's")]
async fn accept(
    l: &TcpListener,
    seen: &Arc<Mutex<Vec<Seen>>>,
    refuse: impl Fn(&Seen) -> Option<StatusCode> + Unpin,
) -> Option<WebSocketStream<TcpStream>> {
    let (tcp, _) = l.accept().await.unwrap();
    let seen = seen.clone();
    let cb = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let s = Seen {
            uri: req.uri().to_string(),
            auth: req.headers().get("Authorization").and_then(|v| v.to_str().ok()).map(str::to_owned),
            at: Instant::now(),
        };
        let verdict = refuse(&s);
        seen.lock().unwrap().push(s);
        if let Some(status) = verdict {
            let mut e = ErrorResponse::new(Some("refused by the test".into()));
            *e.status_mut() = status;
            return Err(e);
        }
        resp.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("roomcast.json.v1"));
        Ok(resp)
    };
    tokio_tungstenite::accept_hdr_async(tcp, cb).await.ok()
}

async fn send(ws: &mut WebSocketStream<TcpStream>, json: &str) {
    ws.send(Message::text(json.to_owned())).await.unwrap();
}

/// Collects events into a shared list (with their arrival time).
fn collect(mut ev: Events) -> Arc<Mutex<Vec<(Instant, Event)>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    tokio::spawn(async move {
        while let Some(e) = ev.recv().await {
            o.lock().unwrap().push((Instant::now(), e));
        }
    });
    out
}

async fn wait_for(d: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

fn fast_backoff() -> Backoff {
    Backoff { min: Duration::from_millis(50), max: Duration::from_millis(200), ..Backoff::default() }
}

#[tokio::test]
async fn a_silent_connection_is_dropped_within_the_liveness_bound_and_resumed() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let liveness = Duration::from_millis(1000);
    let (client, ev) = Client::start(Config::url(&url).room("r1").liveness(liveness).backoff(fast_backoff())).unwrap();
    let events = collect(ev);

    // First connection: joined and one message, then silence (never read: no pong either).
    let mut ws = accept(&l, &seen, |_| None).await.unwrap();
    send(&mut ws, r#"{"type":"joined","room":"r1","seq":4,"epoch":"e1"}"#).await;
    send(
        &mut ws,
        r#"{"type":"batch","room":"r1","messages":[{"seq":5,"ts_us":1,"kind":"gift","user":"u","body":{}}]}"#,
    )
    .await;
    let quiet_from = Instant::now();
    // Second connection: resumes from 5 in e1.
    let _ws2 = accept(&l, &seen, |_| None).await.unwrap();
    let back = Instant::now();
    let s = seen.lock().unwrap().clone();
    assert_eq!(s[0].uri, "/ws?room=r1");
    assert_eq!(s[1].uri, "/ws?room=r1&since=5&epoch=e1");
    let silent = back - quiet_from;
    assert!(silent >= liveness && silent < liveness * 2, "dead connection noticed after {silent:?}");
    {
        let ev = events.lock().unwrap();
        assert!(
            ev.iter()
                .any(|(_, e)| matches!(e, Event::Error(ErrorEvent::Transport(m)) if m.contains("nothing received"))),
            "{ev:?}"
        );
    }
    drop(ws);
    client.close().await;
}

#[tokio::test]
async fn tokens_are_refetched_on_401_and_4001_and_1013_waits_its_floor() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let tokens = TokenSource::new(move || {
        let c = c.clone();
        async move {
            let mut n = c.lock().unwrap();
            *n += 1;
            Ok(format!("token-{n}"))
        }
    });
    let (client, ev) = Client::start(Config::url(&url).room("r1").backoff(fast_backoff()).token(tokens)).unwrap();
    let events = collect(ev);

    // 1: token-1 refused (401).
    assert!(accept(&l, &seen, |_| Some(StatusCode::UNAUTHORIZED)).await.is_none());
    // 2: token-2 accepted; joined; the token expires: error + close 4001.
    let mut ws = accept(&l, &seen, |_| None).await.unwrap();
    send(&mut ws, r#"{"type":"joined","room":"r1","seq":9,"epoch":"e"}"#).await;
    send(&mut ws, r#"{"type":"error","code":"token_expired","message":"expired"}"#).await;
    ws.close(Some(CloseFrame { code: CloseCode::Library(4001), reason: "token expired".into() })).await.unwrap();
    // 3: token-3; a join whose replay is over the edge's budget: close 1013.
    let mut ws = accept(&l, &seen, |_| None).await.unwrap();
    ws.close(Some(CloseFrame { code: CloseCode::Again, reason: "try later".into() })).await.unwrap();
    let closed_1013 = Instant::now();
    // 4: same token, same since, not before the 1013 floor (1 s).
    let _ws = accept(&l, &seen, |_| None).await.unwrap();

    let s = seen.lock().unwrap().clone();
    let auth: Vec<_> = s.iter().map(|x| x.auth.clone().unwrap_or_default()).collect();
    assert_eq!(auth, ["Bearer token-1", "Bearer token-2", "Bearer token-3", "Bearer token-3"]);
    // The fake edge never closes its side of the TCP connection after a close frame: the
    // client does not wait for it (it would until its next ping, seconds later).
    assert!(s[2].at - s[1].at < Duration::from_secs(2), "4001 reconnect took {:?}", s[2].at - s[1].at);
    assert_eq!(s[3].uri, "/ws?room=r1&since=9&epoch=e", "1013: the same since");
    assert!(s[3].at - closed_1013 < Duration::from_secs(3), "1013 waited {:?}", s[3].at - closed_1013);
    assert!(s[3].at - closed_1013 >= Duration::from_secs(1), "1013 waited {:?}", s[3].at - closed_1013);
    assert!(
        wait_for(Duration::from_secs(2), || {
            let ev = events.lock().unwrap();
            let codes: Vec<String> = ev
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::Error(e) => Some(e.code()),
                    _ => None,
                })
                .collect();
            codes.contains(&"http:401".into())
                && codes.contains(&"token_expired".into())
                && codes.contains(&"close:4001".into())
                && codes.contains(&"close:1013".into())
        })
        .await,
        "{:?}",
        events.lock().unwrap()
    );
    client.close().await;
}
