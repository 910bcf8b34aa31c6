//! The committed seed corpora (`corpus/TARGET/`): a few meaningful inputs per target, in the
//! target's input format, so that a short run starts from the shapes real traffic has instead
//! of finding them. `examples/seeds.rs` writes them; regenerate after changing a format.

use edge::fuzzing::{ModEvent, RoomMeta, store_encode_meta, store_encode_msg, store_msg_key};
use roomcast_proto::envelope::{
    ClientMsg, PushMessage, ServerMsg, encode_client_json, encode_client_rkyv, encode_json, encode_rkyv,
};
use roomcast_proto::ws::{OpCode, close_frame, encode_client_frame};

/// One seed: the target, a file name saying what it is, the bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// A client frame with the given first byte (FIN, RSV, opcode) and payload.
fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = encode_client_frame(OpCode::Binary, payload, MASK);
    f[0] = b0;
    f
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// WebSocket streams worth starting from: what clients send, and each kind of violation.
fn ws_streams() -> Vec<(&'static str, Vec<u8>)> {
    let text = "héllo wörld".as_bytes();
    vec![
        ("join-text", frame(0x81, br#"{"op":"join","room":"r1","since":5}"#)),
        (
            "fragmented-text-ping-between",
            cat(&[&frame(0x01, &text[..3]), &frame(0x89, b"p"), &frame(0x00, &text[3..8]), &frame(0x80, &text[8..])]),
        ),
        ("binary-300", frame(0x82, &[7u8; 300])),
        ("ping-pong-close", cat(&[&frame(0x89, b"hi"), &frame(0x8A, b""), &frame(0x88, &[0x03, 0xe8, b'o', b'k'])])),
        ("close-empty-then-more", cat(&[&frame(0x88, b""), &frame(0x81, b"after")])),
        ("close-code-1014", frame(0x88, &1014u16.to_be_bytes())),
        ("close-code-1005", frame(0x88, &1005u16.to_be_bytes())),
        ("close-one-byte", frame(0x88, &[3])),
        ("close-reason-not-utf8", frame(0x88, &[0x03, 0xe8, 0xff])),
        ("unmasked", vec![0x81, 0x02, b'h', b'i']),
        ("rsv-bits", frame(0xC1, b"x")),
        ("reserved-opcode", frame(0x83, b"x")),
        ("fragmented-ping", frame(0x09, b"x")),
        ("ping-126", frame(0x89, &[0u8; 126])),
        ("continuation-alone", frame(0x80, b"x")),
        ("text-inside-fragments", cat(&[&frame(0x01, b"a"), &frame(0x81, b"b")])),
        ("text-not-utf8", frame(0x81, &[0xce, 0x28])),
        ("utf8-split-over-fragments", cat(&[&frame(0x01, &"€".as_bytes()[..1]), &frame(0x80, &"€".as_bytes()[1..])])),
        ("utf8-cut-at-end", cat(&[&frame(0x01, b"ok"), &frame(0x80, &[0xe2, 0x82])])),
        ("frame-over-limit", frame(0x82, &[0u8; 201])),
        (
            "message-over-limit",
            cat(&[
                &frame(0x02, &[1u8; 200]),
                &frame(0x00, &[2u8; 200]),
                &frame(0x00, &[3u8; 200]),
                &frame(0x80, &[4u8; 1]),
            ]),
        ),
        ("len64-top-bit", vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]),
        ("len16-truncated", frame(0x82, &[9u8; 150])[..60].to_vec()),
        ("server-close-frame-as-client", close_frame(1001, "bye")),
    ]
}

fn request(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: edge.example:8080\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

fn handshakes() -> Vec<(&'static str, Vec<u8>)> {
    let with = |s: String, tail: &[u8]| cat(&[s.as_bytes(), tail]);
    vec![
        ("upgrade", with(request("/ws?room=show-1", ""), b"")),
        (
            "upgrade-all-fields-then-frame",
            with(
                request(
                    "/ws?room=show%2D1&since=42&token=a+b",
                    "Origin: https://app.example\r\nSec-WebSocket-Protocol: foo, roomcast.rkyv.v2\r\n\
                     Sec-WebSocket-Protocol: roomcast.json.v1\r\nAuthorization: Bearer abc.def.ghi\r\n\
                     Sec-WebSocket-Extensions: permessage-deflate\r\n",
                ),
                &frame(0x81, br#"{"op":"ping"}"#),
            ),
        ),
        ("upgrade-absolute-form", with(request("http://edge.example/ws?room=r", ""), b"")),
        ("upgrade-lf-only", request("/ws?room=r", "").replace("\r\n", "\n").into_bytes()),
        ("upgrade-bad-key", request("/ws?room=r", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "short").into_bytes()),
        ("upgrade-version-8", request("/ws?room=r", "").replace("Version: 13", "Version: 8").into_bytes()),
        ("upgrade-two-hosts", with(request("/ws?room=r", "Host: other\r\n"), b"")),
        ("upgrade-with-body", with(request("/ws?room=r", "Content-Length: 5\r\n"), b"hello")),
        ("upgrade-bad-percent", with(request("/ws?room=%zz", ""), b"")),
        ("http-1.0", request("/ws", "").replace("HTTP/1.1", "HTTP/1.0").into_bytes()),
        ("http-2", request("/ws", "").replace("HTTP/1.1", "HTTP/2.0").into_bytes()),
        ("post", request("/ws", "").replacen("GET", "POST", 1).into_bytes()),
        ("asterisk", request("*", "").into_bytes()),
        (
            "sse",
            b"GET /sse?room=r&since=3 HTTP/1.1\r\nHost: h\r\nLast-Event-ID: 7\r\nAccept: text/event-stream\r\n\r\n"
                .to_vec(),
        ),
        ("sse-preflight", b"OPTIONS /sse?room=r HTTP/1.1\r\nHost: h\r\nOrigin: https://a.example\r\n\r\n".to_vec()),
        ("tls-client-hello", vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]),
        ("partial", request("/ws?room=r", "")[..40].as_bytes().to_vec()),
    ]
}

fn push(seq: u64, body: &str) -> PushMessage {
    PushMessage {
        seq,
        ts_us: 1_800_000_000_000_000 + seq,
        kind: "gift".into(),
        user: "alice".into(),
        body: body.into(),
    }
}

fn client_msgs() -> Vec<(&'static str, ClientMsg)> {
    vec![
        ("join", ClientMsg::Join { room: "show-1".into(), since: None, epoch: None }),
        ("join-since", ClientMsg::Join { room: "show-1".into(), since: Some(41), epoch: Some("1800000000".into()) }),
        ("leave", ClientMsg::Leave),
        (
            "publish",
            ClientMsg::Publish {
                kind: "chat".into(),
                user: String::new(),
                body: r#"{"text":"hi \u00e9","n":12345678901234567890123,"f":1e2}"#.into(),
            },
        ),
        ("refresh", ClientMsg::Refresh { token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into() }),
        ("ping", ClientMsg::Ping),
    ]
}

fn server_msgs() -> Vec<(&'static str, ServerMsg)> {
    vec![
        (
            "batch",
            ServerMsg::Batch {
                room: "show-1".into(),
                messages: vec![push(1, r#"{"gift":"rose","n":3}"#), push(2, "[1,2,{\"a\":null}]")],
                online: Some(1200),
            },
        ),
        ("joined", ServerMsg::Joined { room: "show-1".into(), seq: 40, epoch: "1800000000".into(), online: None }),
        ("gap", ServerMsg::Gap { room: "show-1".into(), from: 3, to: 9 }),
        (
            "goaway",
            ServerMsg::Goaway { url: "http://edge/v1/route".into(), reason: "drain".into(), reconnect_after_ms: 250 },
        ),
        ("reset", ServerMsg::Reset { room: "r".into(), epoch: "2".into(), seq: 0, reason: "epoch".into() }),
        ("error", ServerMsg::Error { code: "bad_kind".into(), message: "kind may only hold a-z".into() }),
        ("pong", ServerMsg::Pong),
    ]
}

fn publish_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let deep = format!("{{\"kind\":\"chat\",\"body\":{}1{}}}", "[".repeat(33), "]".repeat(33));
    vec![
        ("gift", br#"{"kind":"gift","user":"alice","body":{"gift":"rose","count":3}}"#.to_vec()),
        ("chat-no-user", br#"{"kind":"chat","body":"hello"}"#.to_vec()),
        ("big-number-body", br#"{"kind":"chat","body":12345678901234567890123.5e-3}"#.to_vec()),
        ("body-nested-32", format!("{{\"kind\":\"chat\",\"body\":{}{}}}", "[".repeat(32), "]".repeat(32)).into_bytes()),
        ("body-nested-33", deep.into_bytes()),
        ("bad-kind", br#"{"kind":"Gift!","body":1}"#.to_vec()),
        ("unknown-field", br#"{"kind":"chat","body":1,"room":"x"}"#.to_vec()),
        ("user-control-char", br#"{"kind":"chat","user":"a\u0007b","body":1}"#.to_vec()),
        ("string-with-brackets", br#"{"kind":"chat","body":"[[[{{{\"]]]"}"#.to_vec()),
    ]
}

/// A netlink message.
fn nlmsg(seq: u32, ty: u16, body: &[u8]) -> Vec<u8> {
    let len = 16 + body.len();
    let mut m = Vec::new();
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&0x2u16.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m.resize(len.next_multiple_of(4), 0);
    m
}

/// An `inet_diag_msg` of an established IPv4 socket, with a `tcp_info` attribute.
fn diag_socket(family: u8) -> Vec<u8> {
    let mut b = vec![0u8; 72];
    b[0] = family;
    b[1] = 1;
    b[4..6].copy_from_slice(&8080u16.to_be_bytes());
    b[6..8].copy_from_slice(&50000u16.to_be_bytes());
    b[24..28].copy_from_slice(&[10, 0, 0, 7]);
    b[44..48].copy_from_slice(&7u32.to_ne_bytes());
    b[56..60].copy_from_slice(&10u32.to_ne_bytes());
    b[60..64].copy_from_slice(&2000u32.to_ne_bytes());
    let mut info = vec![0u8; 4 + 232];
    info[0..2].copy_from_slice(&236u16.to_ne_bytes());
    info[2..4].copy_from_slice(&2u16.to_ne_bytes());
    info[104..108].copy_from_slice(&5u32.to_ne_bytes());
    b.extend(info);
    b
}

fn sock_diag() -> Vec<(&'static str, Vec<u8>)> {
    let seq = 9u32.to_ne_bytes();
    let batch = |msgs: &[Vec<u8>]| cat(&[&[0u8], &seq, &msgs.concat()]);
    vec![
        (
            "sockets-then-done",
            batch(&[nlmsg(9, 20, &diag_socket(2)), nlmsg(9, 20, &diag_socket(10)), nlmsg(9, 3, &[0; 4])]),
        ),
        ("other-dump-ignored", batch(&[nlmsg(8, 20, &diag_socket(2)), nlmsg(9, 3, &[0; 4])])),
        ("error-eperm", batch(&[nlmsg(9, 2, &(-1i32).to_ne_bytes())])),
        ("error-errno-min", batch(&[nlmsg(9, 2, &i32::MIN.to_ne_bytes())])),
        ("short-body", batch(&[nlmsg(9, 20, &[1, 2, 3])])),
        ("ports", cat(&[&[1u8], &8080u16.to_ne_bytes(), &8081u16.to_ne_bytes(), &443u16.to_ne_bytes()])),
        ("one-port", cat(&[&[1u8], &80u16.to_ne_bytes()])),
    ]
}

const CLUSTER_NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host-4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383 [16000->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
a1b2c3 :0@0 master,fail,noaddr - 1 1 0 disconnected
";

fn redis() -> Vec<(&'static str, Vec<u8>)> {
    let m = |mode: u8, s: &str| cat(&[&[mode], s.as_bytes()]);
    let ev = |e: ModEvent| cat(&[&[1u8], &serde_json::to_vec(&e).unwrap_or_default()]);
    vec![
        (
            "message-gift",
            m(
                0,
                r#"{"ep":1800000000,"seq":17,"ts_us":1800000000000123,"kind":"gift","user":"al\/ice","md":1,"body":{"gift":"rose"}}"#,
            ),
        ),
        (
            "message-chat-raw-number",
            m(0, r#"{"ep":1,"seq":2,"ts_us":3,"kind":"chat","user":"","md":0,"body":1.50e+3}"#),
        ),
        ("online", m(0, r#"{"online":1234}"#)),
        ("online-extra-field", m(0, r#"{"online":1,"x":2}"#)),
        ("kick", ev(ModEvent::Kick { user: "mallory".into(), from: "edge-a".into() })),
        (
            "ban",
            ev(ModEvent::Ban {
                room: "show-1".into(),
                user: "mallory".into(),
                until_ms: 1_800_000_000_000,
                from: "edge-a".into(),
            }),
        ),
        ("unban", ev(ModEvent::Unban { room: "show-1".into(), user: "mallory".into(), from: "edge-b".into() })),
        ("channel", m(2, "rc:{show-1}:ch")),
        ("channel-nested-braces", m(2, "rc:{a}:ch}:ch")),
        ("cluster-nodes", m(3, CLUSTER_NODES)),
    ]
}

fn store() -> Vec<(&'static str, Vec<u8>)> {
    let msg = push(5, r#"{"gift":"rose"}"#);
    let with_seq = |v: Vec<u8>| cat(&[&[0u8], &5u64.to_le_bytes(), &v]);
    let meta = RoomMeta { epoch: 1_800_000_000, seq_hi: 1024, evicted_upto: 3, touched_s: 1_800_000_100 };
    vec![
        ("msg", with_seq(store_encode_msg(&msg, None))),
        ("msg-keyed", with_seq(store_encode_msg(&msg, Some("order-77")))),
        ("msg-truncated", with_seq(store_encode_msg(&msg, Some("order-77"))[..14].to_vec())),
        ("meta", cat(&[&[1u8], &store_encode_meta(&meta)])),
        ("key", cat(&[&[2u8], &store_msg_key("show-1", 9)[7..], b"show-1"])),
        ("made", cat(&[&[3u8], &[4], b"gift", &[5], b"alice", &[8], b"order-77", b"{\"n\":1}"])),
    ]
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &'static str, bytes: Vec<u8>| out.push(Seed { target, name, bytes });
    for (name, stream) in ws_streams() {
        // Small limits; a few chunkings: one read, 1-byte reads, uneven reads with an empty one.
        add("ws_decoder", name, cat(&[&[1, 0], &stream]));
        add("ws_differential", name, cat(&[&[1], &stream]));
    }
    let (_, stream) = &ws_streams()[1];
    add("ws_decoder", "byte-at-a-time", cat(&[&[1, 1, 1], stream]));
    add("ws_decoder", "uneven-reads", cat(&[&[1, 4, 3, 0, 11, 2], stream]));
    add("ws_decoder", "default-limits", cat(&[&[0, 2, 5, 9], &frame(0x82, &[5u8; 1000])]));
    add("ws_differential", "tight-limits", cat(&[&[0], &frame(0x82, &[5u8; 131])]));
    for (name, req) in handshakes() {
        add("handshake", name, cat(&[&[128], &req]));
    }
    for (name, m) in client_msgs() {
        add("signalling", name, cat(&[&[0], &encode_client_json(&m)]));
        add("signalling", leak(format!("{name}-rkyv")), cat(&[&[1], &encode_client_rkyv(&m).unwrap_or_default()]));
    }
    for (name, m) in server_msgs() {
        let mut json = Vec::new();
        let _ = encode_json(&m, &mut json);
        add("signalling", leak(format!("server-{name}")), cat(&[&[2], &json]));
        add("signalling", leak(format!("server-{name}-rkyv")), cat(&[&[3], &encode_rkyv(&m).unwrap_or_default()]));
    }
    for (name, body) in publish_bodies() {
        add("publish_body", name, body);
    }
    for (name, b) in sock_diag() {
        add("sock_diag", name, b);
    }
    for (name, b) in redis() {
        add("redis_messages", name, b);
    }
    for (name, b) in store() {
        add("store_records", name, b);
    }
    out
}

/// Seed names made at run time live as long as the program (a few dozen short strings).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}
