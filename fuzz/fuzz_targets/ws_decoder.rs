//! The WebSocket frame decoder fed in random chunkings: the input decides where reads end.
//!
//! Input: `flags`, `n`, then `n % 16` chunk sizes, then the byte stream. Bit 0 of `flags`
//! picks the small limits (`roomcast_fuzz::SMALL`) or the edge's defaults. The stream is cut
//! into chunks of the given sizes in turn (0: an empty read).
//!
//! Checks: chunked decoding gives exactly the events and the verdict (close code and reason)
//! of one-shot decoding; what the decoder buffers stays within its bounds; every event keeps
//! the protocol's promises (text is UTF-8, control payloads at most 125 bytes, a close code is
//! one a peer may send, messages within the limit); and re-encoding the events as client
//! frames decodes to the same events.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_fuzz::{Ev, SMALL, decode_chunks};
use roomcast_proto::ws::{Limits, OpCode, close_code_allowed, encode_client_frame};

fuzz_target!(|data: &[u8]| {
    let [flags, n, rest @ ..] = data else { return };
    let n = usize::from(*n % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let limits = if flags & 1 == 1 { SMALL } else { Limits::default() };

    let mut chunks: Vec<&[u8]> = Vec::new();
    if sizes.iter().all(|&s| s == 0) {
        // No sizes, or only empty reads: those, then the whole stream in one read.
        chunks.extend(sizes.iter().map(|_| &stream[..0]));
        chunks.push(stream);
    } else {
        let mut at = 0;
        for &s in sizes.iter().cycle() {
            if at == stream.len() {
                break;
            }
            let size = usize::from(s).min(stream.len() - at);
            chunks.push(&stream[at..at + size]);
            at += size;
        }
    }
    let largest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);

    let (whole, _) = decode_chunks(limits, [stream]);
    let (chunked, decoder) = decode_chunks(limits, chunks.iter().copied());
    assert_eq!(whole, chunked, "chunked decoding differs from one-shot decoding");

    // Bounds: a frame straddling reads (header, payload so far, and the read it was joined
    // to), a message being assembled; a Vec may hold up to twice what it grew to.
    let bound = 2 * (14 + limits.max_frame + largest) + 2 * limits.max_message;
    assert!(decoder.buffered_bytes() <= bound, "buffers {} bytes, bound {bound}", decoder.buffered_bytes());

    for e in &whole.events {
        match e {
            Ev::Text(t) => {
                assert!(std::str::from_utf8(t).is_ok(), "text event is not UTF-8");
                assert!(t.len() <= limits.max_message);
            }
            Ev::Binary(b) => assert!(b.len() <= limits.max_message),
            Ev::Ping(p) | Ev::Pong(p) => assert!(p.len() <= 125),
            Ev::Close(code, reason) => {
                assert!(code.is_none_or(close_code_allowed), "close code {code:?} let through");
                assert!(code.is_some() || reason.is_empty());
                assert!(std::str::from_utf8(reason).is_ok() && reason.len() <= 123);
            }
        }
    }
    // A close ends the stream: nothing after it.
    if let Some(i) = whole.events.iter().position(|e| matches!(e, Ev::Close(..))) {
        assert_eq!(i + 1, whole.events.len(), "events after a close");
    }

    // The events, re-encoded as one client frame each, decode to themselves.
    let mut again = Vec::new();
    for e in &whole.events {
        let (op, payload) = match e {
            Ev::Text(p) => (OpCode::Text, p.clone()),
            Ev::Binary(p) => (OpCode::Binary, p.clone()),
            Ev::Ping(p) => (OpCode::Ping, p.clone()),
            Ev::Pong(p) => (OpCode::Pong, p.clone()),
            Ev::Close(None, _) => (OpCode::Close, Vec::new()),
            Ev::Close(Some(code), reason) => (OpCode::Close, [&code.to_be_bytes()[..], reason].concat()),
        };
        let mask = [flags.wrapping_mul(31), n as u8, 0x5a, 0xa5];
        if payload.len() <= limits.max_frame {
            again.extend(encode_client_frame(op, &payload, mask));
            continue;
        }
        // A message over one frame's limit goes in fragments (only data messages can be).
        let parts: Vec<&[u8]> = payload.chunks(limits.max_frame).collect();
        for (i, part) in parts.iter().enumerate() {
            let mut f = encode_client_frame(OpCode::Binary, part, mask);
            let op = match (i, op) {
                (0, OpCode::Text) => 0x1,
                (0, _) => 0x2,
                _ => 0x0,
            };
            f[0] = if i + 1 == parts.len() { 0x80 } else { 0 } | op;
            again.extend(f);
        }
    }
    let (re, _) = decode_chunks(limits, [again.as_slice()]);
    assert_eq!(re.result, Ok(()));
    assert_eq!(re.events, whole.events, "re-encoded events decode differently");
});
