//! WebSocket clients of the edge (tokio-tungstenite) and the envelopes they read.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use roomcast_proto::envelope::{self, ServerMsg};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client (raw TCP, 4 KiB receive buffer) that joins `room` and never reads.
pub async fn never_reader(addr: std::net::SocketAddr, room: &str) -> tokio::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&addr.into()).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut s = tokio::net::TcpStream::from_std(s.into()).unwrap();
    let req = format!(
        "GET /ws?room={room} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes()).await.unwrap();
    s
}

/// Connects with the given subprotocol (None: offer none).
pub async fn connect(url: &str, proto: Option<&str>) -> Ws {
    let mut req = url.into_client_request().expect("request");
    if let Some(p) = proto {
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).expect("header"));
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("connect");
    if let Some(p) = proto {
        assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok()), Some(p));
    }
    ws
}

/// Next envelope (JSON text or rkyv binary), skipping pings and batches that carry only an
/// online count (presence tests read those with `next_any`); None on close or end.
pub async fn next_msg(ws: &mut Ws) -> Option<ServerMsg> {
    loop {
        match next_any(ws).await? {
            ServerMsg::Batch { messages, online: Some(_), .. } if messages.is_empty() => {}
            m => return Some(m),
        }
    }
}

/// Next envelope, whatever it is (pings skipped); None on close or end.
pub async fn next_any(ws: &mut Ws) -> Option<ServerMsg> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return Some(envelope::decode_json(t.as_bytes()).expect("json envelope")),
            Ok(Message::Binary(b)) => return Some(envelope::decode_rkyv(&b).expect("rkyv envelope")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Like `next_msg` with a deadline.
pub async fn next_msg_within(ws: &mut Ws, d: Duration) -> Option<ServerMsg> {
    tokio::time::timeout(d, next_msg(ws)).await.ok().flatten()
}

/// Waits for the close frame and returns its code.
pub async fn close_code(ws: &mut Ws, d: Duration) -> Option<u16> {
    let fut = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return Some(u16::from(f.code)),
                Some(Ok(Message::Close(None))) => return None,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    };
    tokio::time::timeout(d, fut).await.ok().flatten()
}

pub async fn send_json(ws: &mut Ws, v: serde_json::Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Expects `Joined` for `room` and returns its seq.
pub async fn expect_joined(ws: &mut Ws, room: &str) -> u64 {
    match next_msg_within(ws, Duration::from_secs(10)).await {
        Some(ServerMsg::Joined { room: r, seq, .. }) if r == room => seq,
        other => panic!("expected joined {room}, got {other:?}"),
    }
}
