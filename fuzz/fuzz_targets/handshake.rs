//! The HTTP upgrade parser (`roomcast_proto::handshake::parse`: WebSocket upgrades, the SSE
//! request and its CORS preflight), as the shard uses it: parsed again from the start on each
//! read, so it must give the same answer whatever the reads were.
//!
//! Input: `cut`, then the request bytes. `cut` (scaled to the length) is where an earlier read
//! ended.
//!
//! Checks: no panic; an answer on a prefix is never taken back (a request parsed from the first
//! read parses the same from all of it; a refusal stays a refusal); a parsed request is the
//! same parsed from its own `n` bytes; an upgrade's key is base64 of 16 bytes and its answers
//! are well-formed; a refusal's status is one the parser documents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_proto::handshake::{Request, accept_key, error_response, parse, response_101};

fuzz_target!(|data: &[u8]| {
    let [cut, buf @ ..] = data else { return };
    let full = parse(buf);
    let c = buf.len() * usize::from(*cut) / 255;
    match parse(&buf[..c]) {
        Ok(None) => {}
        Ok(Some(first)) => assert_eq!(full, Ok(Some(first)), "a request parsed from a prefix parses differently"),
        Err(e) => assert!(full.is_err(), "refused a prefix ({e:?}), accepted the whole: {full:?}"),
    }
    match full {
        Ok(None) => {}
        Ok(Some((req, n))) => {
            assert!(n <= buf.len());
            assert_eq!(parse(&buf[..n]), Ok(Some((req.clone(), n))), "the request's own bytes parse differently");
            match req {
                Request::WebSocket(up) => {
                    assert!(up.path.starts_with('/'), "path {:?}", up.path);
                    use base64::Engine as _;
                    let raw = base64::engine::general_purpose::STANDARD.decode(&up.key).expect("key is base64");
                    assert_eq!(raw.len(), 16);
                    assert_eq!(accept_key(&up.key).len(), 28);
                    let proto = up.select_subprotocol().ok().flatten();
                    let answer = response_101(&up.key, proto);
                    assert!(answer.starts_with(b"HTTP/1.1 101 ") && answer.ends_with(b"\r\n\r\n"));
                    let _ = up.query_param("room");
                }
                Request::EventStream(es) => {
                    let _ = es.query_param("room");
                }
                Request::Preflight { .. } => {}
            }
        }
        Err(e) => {
            assert!(matches!(e.status, 400 | 404 | 405 | 414 | 426 | 431 | 505), "status {}", e.status);
            let answer = error_response(&e);
            assert!(answer.starts_with(format!("HTTP/1.1 {} ", e.status).as_bytes()));
        }
    }
});
