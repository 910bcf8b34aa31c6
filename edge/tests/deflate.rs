//! permessage-deflate (RFC 7692) against the real binary, over raw TCP with flate2 inflating
//! (tokio-tungstenite does not speak the extension): members with and without it in one room
//! get every gift, the compressed frames inflate to the plain ones, a batch is compressed once
//! for all its deflate members, client messages are inflated, and a deflate bomb is closed with
//! 1009 while the edge carries on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use roomcast_proto::ws::{self, OpCode};
use roomcast_testsupport::{EdgeProc, Publisher, metric, publish_gift};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const CHROME_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// One raw WebSocket client.
struct Raw {
    s: TcpStream,
    got: Vec<u8>,
    /// The 101 answer's head.
    head: String,
}

/// A frame as the server sent it: RSV1, opcode and payload (as sent: compressed if RSV1).
struct Frame {
    rsv1: bool,
    opcode: OpCode,
    payload: Vec<u8>,
}

impl Raw {
    fn connect(addr: SocketAddr, path: &str, extensions: Option<&str>) -> Self {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let ext = extensions.map_or(String::new(), |e| format!("Sec-WebSocket-Extensions: {e}\r\n"));
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{ext}\r\n"
        );
        s.write_all(req.as_bytes()).expect("write");
        let mut c = Self { s, got: Vec::new(), head: String::new() };
        let end = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        c.fill_until(|b| end(b).is_some());
        let n = end(&c.got).unwrap_or_else(|| panic!("no answer: {:?}", String::from_utf8_lossy(&c.got)));
        c.head = String::from_utf8_lossy(&c.got[..n]).into_owned();
        c.got.drain(..n);
        c
    }

    fn fill_until(&mut self, done: impl Fn(&[u8]) -> bool) {
        let mut buf = vec![0u8; 65536];
        while !done(&self.got) {
            match self.s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The next frame, or None if the connection ended (or 10 s passed) first.
    fn frame(&mut self) -> Option<Frame> {
        let complete =
            |b: &[u8]| matches!(ws::parse_header(b), Ok(Some(h)) if b.len() >= h.header_len + h.payload_len as usize);
        self.fill_until(complete);
        let h = ws::parse_header(&self.got).ok()??;
        let end = h.header_len + h.payload_len as usize;
        if self.got.len() < end {
            return None;
        }
        let payload = self.got[h.header_len..end].to_vec();
        self.got.drain(..end);
        assert!(h.fin, "the edge sends whole messages");
        Some(Frame { rsv1: h.rsv1, opcode: h.opcode, payload })
    }

    fn send(&mut self, opcode: OpCode, payload: &[u8], rsv1: bool) {
        let mut f = ws::encode_client_frame(opcode, payload, [1, 2, 3, 4]);
        if rsv1 {
            f[0] |= 0x40;
        }
        self.s.write_all(&f).expect("write");
    }

    /// The next text message, inflated when compressed; close frames end it (None).
    fn text(&mut self) -> Option<(bool, String)> {
        loop {
            let f = self.frame()?;
            match f.opcode {
                OpCode::Text => {
                    let body = if f.rsv1 { inflate(&f.payload) } else { f.payload };
                    return Some((f.rsv1, String::from_utf8(body).expect("UTF-8")));
                }
                OpCode::Close => return None,
                _ => {}
            }
        }
    }

    /// Reads until a close frame: its code.
    fn close_code(&mut self) -> Option<u16> {
        while let Some(f) = self.frame() {
            if f.opcode == OpCode::Close {
                return (f.payload.len() >= 2).then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
            }
        }
        None
    }
}

/// Inflates one message as RFC 7692 §7.2.2 says: append 00 00 ff ff, raw DEFLATE, fresh context
/// (the edge answered server_no_context_takeover).
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(data.len() * 20 + 1024);
    loop {
        let before = d.total_in();
        d.decompress_vec(&input[d.total_in() as usize..], &mut out, FlushDecompress::Sync).expect("valid DEFLATE");
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        assert!(d.total_in() > before || out.len() == out.capacity(), "inflate stuck");
        out.reserve(out.capacity());
    }
}

/// Compresses one message as a client would (raw DEFLATE, sync flush, tail removed).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    loop {
        c.compress_vec(&data[c.total_in() as usize..], &mut out, FlushCompress::Sync).expect("deflate");
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).expect("JSON")
}

/// The batches' texts a member receives until it holds gifts 1..=n (the `joined` first).
fn batches_until(c: &mut Raw, n: u64) -> Vec<(bool, String)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < n as usize && Instant::now() < deadline {
        let Some((rsv1, text)) = c.text() else { break };
        let v = json(&text);
        // Batches of messages (not the online-count notices, which depend on join timing).
        if v["type"] == "batch" && v["messages"].as_array().is_some_and(|m| !m.is_empty()) {
            for m in v["messages"].as_array().expect("messages") {
                seen.insert(m["seq"].as_u64().expect("seq"));
            }
            out.push((rsv1, text));
        }
    }
    assert_eq!(seen, (1..=n).collect(), "every gift, once");
    out
}

fn joined(c: &mut Raw) {
    let (_, text) = c.text().expect("joined");
    assert_eq!(json(&text)["type"], "joined", "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn members_with_and_without_deflate_get_every_gift_from_one_compression() {
    // Two shards: members spread over both, and the batch is still compressed once.
    let edge = EdgeProc::start(&["--shards", "2", "--merge-window-ms", "20"]);
    let path = "/ws?room=mixed";
    let mut zs: Vec<Raw> = (0..3).map(|_| Raw::connect(edge.ws, path, Some(CHROME_OFFER))).collect();
    for z in &zs {
        assert!(z.head.starts_with("HTTP/1.1 101 "), "{}", z.head);
        assert!(
            z.head.contains(
                "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
            ),
            "{}",
            z.head
        );
    }
    let mut plain = Raw::connect(edge.ws, path, None);
    assert!(!plain.head.to_ascii_lowercase().contains("sec-websocket-extensions"), "{}", plain.head);
    for z in &mut zs {
        joined(z);
    }
    joined(&mut plain);
    let p = Publisher::new(edge.http);
    assert_eq!(metric(&p, "roomcast_ws_deflate_connections_total").await, 3.0);
    let made_before = metric(&p, "roomcast_ws_deflate_compressions_total").await;

    let n = 40;
    for i in 1..=n {
        // Live-room-like bodies: a gift with a sender and a message.
        let body =
            serde_json::json!({ "rose": i, "from": format!("viewer-{i}"), "note": "what a great stream, keep going!" });
        let seq = p.publish("mixed", "gift", body).await;
        assert_eq!(seq, i);
    }
    let plain_batches = batches_until(&mut plain, n);
    assert!(plain_batches.iter().all(|(rsv1, _)| !rsv1), "no RSV1 without the extension");
    for z in &mut zs {
        let got = batches_until(z, n);
        // The same batches, byte for byte once inflated, and at least the large ones compressed.
        assert_eq!(
            got.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
            plain_batches.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>()
        );
        assert!(got.iter().any(|(rsv1, _)| *rsv1), "some frames arrived compressed");
        assert!(got.iter().all(|(rsv1, t)| *rsv1 || t.len() < 64), "every batch that pays is compressed");
    }
    // Compress-once: one compression per batch for the three deflate members, not three.
    let made = metric(&p, "roomcast_ws_deflate_compressions_total").await - made_before;
    let batches = plain_batches.len() as f64;
    assert!(made >= 1.0 && made <= batches, "{made} compressions for {batches} batches to 3 deflate members");
    let (_, text) = p.get("/metrics").await;
    let value = |form: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("roomcast_ws_deflate_frame_bytes_total{{form=\"{form}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(value("compressed") > 0.0 && value("compressed") < value("uncompressed"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn compressed_client_messages_are_read_and_a_bomb_gets_1009() {
    let edge = EdgeProc::start(&[]);
    let p = Publisher::new(edge.http);
    // A compressed signalling message is understood (the edge answered
    // client_no_context_takeover: each message on its own).
    let mut c = Raw::connect(edge.ws, "/ws", Some("permessage-deflate"));
    assert!(c.head.contains("client_no_context_takeover"), "{}", c.head);
    for (msg, answer) in [(r#"{"op":"join","room":"bombsite"}"#, "joined"), (r#"{"op":"leave"}"#, "left")] {
        c.send(OpCode::Text, &deflate(msg.as_bytes()), true);
        // Skip online-count notices; the answer comes within a few frames.
        let found = (0..10).any(|_| c.text().is_some_and(|(_, t)| json(&t)["type"] == answer));
        assert!(found, "no {answer} for a compressed {msg}");
    }
    // A bomb: 32 MiB of spaces is about 32 KiB compressed, under the 64 KiB frame limit;
    // inflated it passes the 64 KiB message bound: 1009, without inflating the rest.
    let bomb = deflate(&vec![b' '; 32 << 20]);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let mut bombers: Vec<Raw> = (0..8).map(|_| Raw::connect(edge.ws, "/ws", Some("permessage-deflate"))).collect();
    for b in &mut bombers {
        b.send(OpCode::Text, &bomb, true);
    }
    for b in &mut bombers {
        assert_eq!(b.close_code(), Some(1009));
    }
    // The edge carries on, with its memory where it was (the bound is 64 KiB per message).
    assert_eq!(p.get("/healthz").await.0, 200);
    let rss_mb = metric(&p, "process_resident_memory_bytes").await / 1e6;
    assert!(rss_mb < 500.0, "resident memory {rss_mb} MB after 8 bombs of 32 MiB");
    let mut after = Raw::connect(edge.ws, "/ws?room=bombsite", Some(CHROME_OFFER));
    joined(&mut after);
    publish_gift(&p, "bombsite", 1).await;
    batches_until(&mut after, 1);
    assert!(metric(&p, "roomcast_protocol_errors_total").await >= 8.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn rsv1_rules_malformed_offers_and_the_switch() {
    let edge = EdgeProc::start(&[]);
    // RSV1 without negotiation: 1002.
    let mut c = Raw::connect(edge.ws, "/ws", None);
    c.send(OpCode::Text, &deflate(br#"{"op":"ping"}"#), true);
    assert_eq!(c.close_code(), Some(1002));
    // RSV1 on a control frame, and on a continuation frame: 1002.
    let mut c = Raw::connect(edge.ws, "/ws", Some("permessage-deflate"));
    c.send(OpCode::Ping, b"x", true);
    assert_eq!(c.close_code(), Some(1002));
    let mut c = Raw::connect(edge.ws, "/ws", Some("permessage-deflate"));
    let mut first = ws::encode_client_frame(OpCode::Text, br#"{"op":"#, [9, 9, 9, 9]);
    first[0] &= 0x7f; // not final
    c.s.write_all(&first).expect("write");
    let mut cont = ws::encode_client_frame(OpCode::Continuation, br#""ping"}"#, [9, 9, 9, 9]);
    cont[0] |= 0x40;
    c.s.write_all(&cont).expect("write");
    assert_eq!(c.close_code(), Some(1002));
    // A malformed extension header: 400. An offer the edge cannot honour: declined, next taken.
    let c = Raw::connect(edge.ws, "/ws", Some("permessage-deflate; client_max_window_bits=\"1 5\""));
    assert!(c.head.starts_with("HTTP/1.1 400 "), "{}", c.head);
    let c = Raw::connect(
        edge.ws,
        "/ws",
        Some("permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10"),
    );
    assert!(
        c.head.contains(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10\r\n"
        ),
        "{}",
        c.head
    );
    let c = Raw::connect(edge.ws, "/ws", Some("permessage-deflate; mystery_param"));
    assert!(c.head.starts_with("HTTP/1.1 101 ") && !c.head.contains("Sec-WebSocket-Extensions"), "{}", c.head);
    drop(edge);
    // Switched off: never negotiated.
    let edge = EdgeProc::start(&["--permessage-deflate", "false"]);
    let c = Raw::connect(edge.ws, "/ws", Some(CHROME_OFFER));
    assert!(c.head.starts_with("HTTP/1.1 101 ") && !c.head.contains("Sec-WebSocket-Extensions"), "{}", c.head);
}
