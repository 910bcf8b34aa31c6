//! Our WebSocket decoder against tungstenite's (server role, the same size limits) on the same
//! bytes: the same accept/reject decision, the same messages with the same payloads, and the
//! same close code for a rejection.
//!
//! Input: `flags`, then the byte stream. Bit 0 of `flags` picks one of two sets of limits.
//!
//! Intentional differences, each allowed below and nowhere else:
//! 1. **When a bad frame is refused.** We refuse a frame on its header (not masked, a control
//!    frame fragmented or over 125 bytes, a continuation without a message, a message over the
//!    limit...), before its payload arrives; tungstenite reads the payload first. On an input
//!    that ends inside such a frame, tungstenite is still waiting: the frame is then completed
//!    (zero bytes) and tungstenite must refuse it too.
//! 2. **Which fault is named first.** tungstenite checks a frame's declared length against
//!    `max_frame` before anything else (1009); we check the other faults of the header first
//!    (1002: reserved bits, not masked, a fragmented or too long control frame, a 64-bit
//!    length with its top bit set). Both refuse; only for a frame declaring more than
//!    `max_frame` may the codes differ.
//! 3. **A close code a peer may not send** (1004-1006, 1015, 0-999, 1016-2999, 5000+): we fail
//!    the connection (1002); tungstenite hands the close up as code 1002 "Protocol violation"
//!    and answers it with 1002. Same effect on the wire.
//! 4. **A close frame with both a bad code and a reason that is not UTF-8**: we name the code
//!    (1002), tungstenite the reason (1007). Both refuse.
//! 5. **Close code 1014** (Bad Gateway, in the IANA registry since RFC 6455's publication): we
//!    accept it as a peer's code; tungstenite 0.30 does not know it and treats it as in 3.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_fuzz::{Decoded, Ev, Reference, SMALL, decode_chunks, reference};
use roomcast_proto::ws::{CloseReason, Limits, parse_header};

/// The other limits: a frame limit just over a control frame's, a message of two frames.
const TIGHT: Limits = Limits { max_frame: 130, max_message: 260 };

/// Where the frame ours stopped at starts, and whether the input holds all of it.
fn failing_frame(limits: Limits, stream: &[u8]) -> (usize, bool) {
    let mut at = 0;
    let mut d = roomcast_proto::ws::Decoder::new(limits);
    while at < stream.len() {
        let tail = &stream[at..];
        let end = raw_len(tail).and_then(|l| usize::try_from(l).ok()).and_then(|l| at.checked_add(l));
        let Some(end) = end.filter(|&e| e <= stream.len()) else { return (at, false) };
        if !matches!(parse_header(tail), Ok(Some(_))) {
            return (at, true);
        }
        let mut frame = stream[at..end].to_vec();
        if d.feed(&mut frame, &mut |_| {}).is_err() {
            return (at, true);
        }
        at = end;
    }
    (at, true)
}

/// A frame's header length from its first two bytes.
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

/// The whole length (header and payload) of the frame at the start of `tail`, once its header
/// is there, whatever else is wrong with it.
fn raw_len(tail: &[u8]) -> Option<u64> {
    let hl = header_len(*tail.get(1)?);
    (tail.len() >= hl).then(|| (hl as u64).saturating_add(declared_len(tail)))
}

/// The length a frame header declares, read as far as its bytes go (missing bytes as zeros).
fn declared_len(h: &[u8]) -> u64 {
    let byte = |i: usize| h.get(i).copied().unwrap_or(0);
    match byte(1) & 0x7f {
        126 => u64::from(u16::from_be_bytes([byte(2), byte(3)])),
        127 => u64::from_be_bytes(std::array::from_fn(|i| byte(2 + i))),
        n => u64::from(n),
    }
}

/// The frame at the start of `tail`, completed with zero bytes: header, then payload (not
/// beyond the frame limit: a longer frame is refused on its header).
fn complete(limits: Limits, tail: &[u8]) -> Vec<u8> {
    let mut f = tail.to_vec();
    if f.len() < 2 {
        f.resize(2, 0);
    }
    let header_len = header_len(f[1]);
    if f.len() < header_len {
        f.resize(header_len, 0);
    }
    let len = declared_len(&f);
    if len <= limits.max_frame as u64 {
        f.resize(header_len + len as usize, 0);
    }
    f
}

/// The same close code, or one of differences 2 and 4.
fn same_code(ours: &CloseReason, theirs: u16, declared: u64, limits: Limits) -> bool {
    ours.code == theirs
        || (theirs == 1009 && declared > limits.max_frame as u64)
        || (ours.reason == "invalid close code" && theirs == 1007)
}

/// Difference 5: a 1014 close as tungstenite reports it.
fn normalise(events: &[Ev]) -> Vec<Ev> {
    events
        .iter()
        .map(|e| match e {
            Ev::Close(Some(1014), _) => Ev::Close(Some(1002), b"Protocol violation".to_vec()),
            e => e.clone(),
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let [flags, stream @ ..] = data else { return };
    let limits = if flags & 1 == 1 { SMALL } else { TIGHT };
    let (Decoded { events, result }, _) = decode_chunks(limits, [stream]);
    let theirs = reference(limits, stream);
    let ours = normalise(&events);
    let verdict = |theirs: &Reference| format!("ours: {result:?} after {events:?}\ntheirs: {theirs:?}");
    match (&result, &theirs) {
        (Ok(()), Reference::Open(t)) => assert_eq!(&ours, t, "{}", verdict(&theirs)),
        (Ok(()), Reference::Closed(t)) => {
            assert!(matches!(ours.last(), Some(Ev::Close(..))), "{}", verdict(&theirs));
            assert_eq!(&ours, t, "{}", verdict(&theirs));
        }
        // Difference 3.
        (Err(r), Reference::Closed(t)) if r.reason == "invalid close code" => {
            let mut want = ours.clone();
            want.push(Ev::Close(Some(1002), b"Protocol violation".to_vec()));
            assert_eq!(&want, t, "{}", verdict(&theirs));
        }
        (Err(r), Reference::Failed(t, code, _)) => {
            assert_eq!(&ours, t, "{}", verdict(&theirs));
            let (at, _) = failing_frame(limits, stream);
            let declared = declared_len(&stream[at..]);
            assert!(same_code(r, *code, declared, limits), "{}", verdict(&theirs));
        }
        // Difference 1: tungstenite has not seen the whole frame we refused.
        (Err(r), Reference::Open(_)) => {
            let (at, whole) = failing_frame(limits, stream);
            assert!(!whole, "tungstenite read past a whole frame we refused\n{}", verdict(&theirs));
            let mut padded = stream[..at].to_vec();
            padded.extend(complete(limits, &stream[at..]));
            let again = reference(limits, &padded);
            match &again {
                Reference::Failed(t, code, _) => {
                    assert_eq!(&ours, t, "{}", verdict(&again));
                    assert!(same_code(r, *code, declared_len(&padded[at..]), limits), "{}", verdict(&again));
                }
                Reference::Closed(t) if r.reason == "invalid close code" => {
                    let mut want = ours.clone();
                    want.push(Ev::Close(Some(1002), b"Protocol violation".to_vec()));
                    assert_eq!(&want, t, "{}", verdict(&again));
                }
                _ => panic!("tungstenite accepts the completed frame we refused\n{}", verdict(&again)),
            }
        }
        (Ok(()), Reference::Failed(..)) | (Err(_), Reference::Closed(_)) => {
            panic!("different verdicts\n{}", verdict(&theirs))
        }
    }
});
