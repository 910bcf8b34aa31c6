//! The upgrade as RFC 6455 §4.2.1 and RFC 7230 §5.3 ask, against the real binary over raw TCP:
//! absolute-form targets, fields that must not repeat, the version answer, and requests the size
//! of a browser's behind a CDN and proxies.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use roomcast_proto::envelope::{self, ServerMsg};
use roomcast_testsupport::EdgeProc;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n";

/// A connection that has sent one request.
struct Raw {
    s: TcpStream,
    got: Vec<u8>,
}

impl Raw {
    fn send(addr: SocketAddr, request: &str) -> Self {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(request.as_bytes()).expect("write");
        Self { s, got: Vec::new() }
    }

    /// Reads until `done` holds for what arrived, the peer closes, or 10 s pass.
    fn read_until(&mut self, done: impl Fn(&[u8]) -> bool) {
        let mut buf = [0u8; 4096];
        while !done(&self.got) {
            match self.s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The response head (status line and header fields, up to the blank line).
    fn head(&mut self) -> String {
        let end = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        self.read_until(|b| end(b).is_some());
        let n = end(&self.got).unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&self.got)));
        let head = String::from_utf8_lossy(&self.got[..n]).into_owned();
        self.got.drain(..n);
        head
    }

    /// After a 101: the first server frame (unmasked, unfragmented), decoded as JSON.
    fn first_message(&mut self) -> ServerMsg {
        let frame_len = |b: &[u8]| match b {
            [_, 126, h, l, ..] => Some(4 + usize::from(u16::from_be_bytes([*h, *l]))),
            [_, n, ..] if *n < 126 => Some(2 + usize::from(*n)),
            _ => None,
        };
        self.read_until(|b| frame_len(b).is_some_and(|n| b.len() >= n));
        let n = frame_len(&self.got).expect("a frame after the 101");
        // A text frame, whole; RSV1 set when the request offered permessage-deflate (as the
        // browser-like request does) and the frame was worth compressing.
        assert!(matches!(self.got[0], 0x81 | 0xC1), "an unfragmented text frame: {:#x}", self.got[0]);
        let header = if self.got[1] == 126 { 4 } else { 2 };
        if self.got[0] & 0x40 != 0 {
            let mut inflated = Vec::new();
            let mut d = roomcast_proto::deflate::new_inflater();
            roomcast_proto::deflate::inflate(&mut d, &self.got[header..n], 1 << 20, &mut inflated).expect("inflates");
            return envelope::decode_json(&inflated).expect("json envelope");
        }
        envelope::decode_json(&self.got[header..n]).expect("json envelope")
    }

    /// After an error answer: the body, up to the close.
    fn rest(&mut self) -> String {
        self.read_until(|_| false);
        String::from_utf8_lossy(&self.got).into_owned()
    }
}

fn upgrade(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: edge.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Chrome through a CDN and two proxies: `fields` header fields, one a cookie of `cookie` bytes.
fn browser_request(target: &str, fields: usize, cookie: usize) -> String {
    let mut c = String::from("_ga=GA1.2.1234567890.1700000000; session=s%3Aabcdef0123456789.XyZ; consent=all");
    let mut i = 0;
    while c.len() < cookie {
        c.push_str(&format!("; pref_{i}={}", "v".repeat(40)));
        i += 1;
    }
    c.truncate(cookie);
    let mut h: Vec<String> = [
        "Host: live.example.com",
        "Connection: Upgrade",
        "Pragma: no-cache",
        "Cache-Control: no-cache",
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        "Upgrade: websocket",
        "Origin: https://www.example.com",
        "Sec-WebSocket-Version: 13",
        "Accept-Encoding: gzip, deflate, br, zstd",
        "Accept-Language: en-US,en;q=0.9,de;q=0.8",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        "Sec-WebSocket-Protocol: roomcast.json.v1",
        "X-Forwarded-For: 203.0.113.7, 198.51.100.2",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: live.example.com",
        "X-Forwarded-Port: 443",
        "X-Real-IP: 203.0.113.7",
        "Forwarded: for=203.0.113.7;proto=https;host=live.example.com",
        "Via: 1.1 varnish, 1.1 proxy.internal",
        "CF-Connecting-IP: 203.0.113.7",
        "CF-IPCountry: DE",
        "CF-Ray: 8f1a2b3c4d5e6f70-FRA",
        "CF-Visitor: {\"scheme\":\"https\"}",
        "CDN-Loop: cloudflare",
        "True-Client-IP: 203.0.113.7",
        "X-Request-ID: 5f0c6f1e-9c1a-4c8e-bb3e-1f2a3b4c5d6e",
        "Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "X-Amzn-Trace-Id: Root=1-67891233-abcdef012345678912345678",
        "Sec-Ch-Ua: \"Chromium\";v=\"131\", \"Not_A Brand\";v=\"24\"",
        "Sec-Ch-Ua-Mobile: ?0",
        "Sec-Ch-Ua-Platform: \"Linux\"",
        "Sec-Fetch-Dest: empty",
        "Sec-Fetch-Mode: websocket",
        "Sec-Fetch-Site: same-site",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJl",
        "X-Envoy-External-Address: 203.0.113.7",
        "X-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7",
        "X-B3-SpanId: e457b5a2e4d86bd1",
    ]
    .map(str::to_owned)
    .to_vec();
    h.push(format!("Sec-WebSocket-Key: {KEY}"));
    h.push(format!("Cookie: {c}"));
    let mut i = 0;
    while h.len() < fields {
        h.push(format!("X-Proxy-Hop-{i}: edge-{i}.internal"));
        i += 1;
    }
    assert_eq!(h.len(), fields, "at least the 40 realistic fields");
    let mut r = format!("GET {target} HTTP/1.1\r\n");
    for line in h {
        r.push_str(&line);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r
}

fn expect_upgraded(edge: &EdgeProc, case: &str, request: &str, room: &str) {
    let mut c = Raw::send(edge.ws, request);
    let head = c.head();
    assert!(head.starts_with("HTTP/1.1 101 "), "{case}: {head:?}");
    assert!(head.contains(ACCEPT), "{case}: {head:?}");
    match c.first_message() {
        ServerMsg::Joined { room: r, .. } => assert_eq!(r, room, "{case}"),
        other => panic!("{case}: {other:?}"),
    }
}

fn expect_refused(edge: &EdgeProc, case: &str, request: &str, status: u16) -> String {
    let mut c = Raw::send(edge.ws, request);
    let head = c.head();
    assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{case}: {head:?}");
    let body = c.rest();
    assert!(!body.trim().is_empty(), "{case}: a reason in the body");
    head
}

#[test]
fn upgrades_follow_rfc_6455_and_7230() {
    let edge = EdgeProc::start(&["--shards", "1"]);
    let port = edge.ws.port();

    // (a) Absolute-form target (RFC 7230 §5.3.2: a server MUST accept it): path and query are
    // taken from the URI, so the member joins room r.
    expect_upgraded(&edge, "absolute-form", &upgrade(&format!("http://127.0.0.1:{port}/ws?room=r"), ""), "r");
    expect_upgraded(&edge, "absolute-form ws://", &upgrade(&format!("ws://edge.example:{port}/ws?room=r2"), ""), "r2");
    // Asterisk-form and authority-form are not upgrades.
    expect_refused(&edge, "asterisk-form", &upgrade("*", ""), 400);
    expect_refused(&edge, "authority-form", &upgrade(&format!("127.0.0.1:{port}"), ""), 400);

    // (b) Sec-WebSocket-Key twice (RFC 6455 §11.3.1: MUST NOT appear more than once).
    let twice = upgrade("/ws?room=r", "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n");
    let head = expect_refused(&edge, "two keys", &twice, 400);
    assert!(!head.contains("Sec-WebSocket-Accept"), "{head:?}");

    // (c) Version 8: 426 naming the version the edge speaks (RFC 6455 §4.2.2).
    let v8 = upgrade("/ws?room=r", "").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let head = expect_refused(&edge, "version 8", &v8, 426);
    assert!(head.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{head:?}");

    // (d) A browser behind a CDN and proxies: 40 header fields with a 6 KiB cookie; and one with
    // a 12 KiB cookie, over the old 8 KiB bound and several receive buffers long.
    let browser = browser_request("/ws?room=browser", 40, 6 * 1024);
    expect_upgraded(&edge, "40 fields, 6 KiB cookie", &browser, "browser");
    let big = browser_request("/ws?room=big", 40, 12 * 1024);
    assert!(big.len() > 8192 && big.len() < roomcast_proto::handshake::MAX_REQUEST, "{}", big.len());
    expect_upgraded(&edge, "40 fields, 12 KiB cookie", &big, "big");
    // Over the bounds: 431, not 400.
    let many = browser_request("/ws?room=r", roomcast_proto::handshake::MAX_HEADERS + 1, 100);
    expect_refused(&edge, "too many fields", &many, 431);
}
