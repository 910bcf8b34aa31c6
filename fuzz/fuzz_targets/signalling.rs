//! Signalling and envelopes, both encodings: what a client sends (`decode_client_json` for
//! text frames, `decode_client_rkyv` for binary frames on `roomcast.rkyv.v2`) and what the edge
//! sends, as the clients (the Rust client, the load generator) read it (`decode_json`,
//! `decode_rkyv`).
//!
//! Input: `which` (mod 4 picks the decoder), then the frame payload.
//!
//! Checks: no panic; whatever decodes re-encodes, in both encodings, to something that decodes
//! to the same value (a publish body is the exact JSON text sent, and stays valid JSON).
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_proto::envelope::{
    ClientMsg, ServerMsg, decode_client_json, decode_client_rkyv, decode_json, decode_rkyv, encode_client_json,
    encode_client_rkyv, encode_json, encode_rkyv,
};

fn client_round_trip(msg: &ClientMsg) {
    if let ClientMsg::Publish { body, .. } = msg {
        assert!(serde_json::from_str::<&serde_json::value::RawValue>(body).is_ok(), "body is not JSON: {body:?}");
    }
    let json = encode_client_json(msg);
    assert_eq!(&decode_client_json(&json).expect("own JSON decodes"), msg);
    let rkyv = encode_client_rkyv(msg).expect("encodes as rkyv");
    assert_eq!(&decode_client_rkyv(&rkyv).expect("own rkyv decodes"), msg);
}

/// The bodies of a batch.
fn bodies(msg: &ServerMsg) -> impl Iterator<Item = &str> {
    let messages = match msg {
        ServerMsg::Batch { messages, .. } => messages.as_slice(),
        _ => &[],
    };
    messages.iter().map(|m| m.body.as_str())
}

fn server_round_trip(msg: &ServerMsg) {
    // The rkyv reader does not check bodies (the edge checked them at publish, and clients
    // read batches in place for speed): a body that is not JSON cannot travel as JSON, and one
    // with whitespace around its value (which the edge never sends) loses it there.
    let value_text = |b: &str| serde_json::from_str::<&serde_json::value::RawValue>(b).map(|r| r.get() == b);
    let json_bodies = bodies(msg).all(|b| value_text(b).is_ok());
    let exact_bodies = bodies(msg).all(|b| value_text(b).unwrap_or(false));
    let mut json = Vec::new();
    match encode_json(msg, &mut json) {
        Ok(()) => {
            let back = decode_json(&json).expect("own JSON decodes");
            assert!(!exact_bodies || &back == msg, "JSON round trip: {back:?}");
        }
        Err(e) => assert!(!json_bodies, "a message with JSON bodies does not encode as JSON: {e}"),
    }
    let rkyv = encode_rkyv(msg).expect("encodes as rkyv");
    assert_eq!(&decode_rkyv(&rkyv).expect("own rkyv decodes"), msg);
}

fuzz_target!(|data: &[u8]| {
    let [which, payload @ ..] = data else { return };
    match which % 4 {
        0 => {
            if let Ok(m) = decode_client_json(payload) {
                client_round_trip(&m);
            }
        }
        1 => {
            if let Ok(m) = decode_client_rkyv(payload) {
                client_round_trip(&m);
            }
        }
        2 => {
            if let Ok(m) = decode_json(payload) {
                server_round_trip(&m);
            }
        }
        _ => {
            if let Ok(m) = decode_rkyv(payload) {
                server_round_trip(&m);
            }
        }
    }
});
