//! The publish API's body (`POST /v1/rooms/{room}/messages`): `edge::ingest::PublishRequest`,
//! read as the handler reads it (`parse`, then `check_fields`).
//!
//! Input: the request body.
//!
//! Checks: no panic; an accepted body holds what the edge promises downstream: a valid kind, a
//! user of at most 64 bytes without control characters, a body that a client can read as a
//! JSON value (serde_json's `Value`: numbers within a double's range) nested at most 32 deep;
//! and the message it makes travels in both envelope encodings and through the store's
//! record unchanged (the body byte for byte).
#![no_main]

use edge::fuzzing::{store_decode_msg, store_encode_msg};
use edge::ingest::{MAX_USER_LEN, PublishRequest};
use libfuzzer_sys::fuzz_target;
use roomcast_proto::envelope::{
    MAX_BODY_DEPTH, PushMessage, ServerMsg, decode_json, decode_rkyv, encode_json, encode_rkyv, validate_kind,
};

/// Nesting depth of a JSON value.
fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = PublishRequest::parse(data) else { return };
    assert!(validate_kind(&req.kind).is_ok());
    let checked = req.check_fields();
    // What a client reading the body as a value gets: within 32 levels (serde_json's own bound
    // is 128), only a number out of a double's range can fail here.
    let value = serde_json::from_str::<serde_json::Value>(req.body.get());
    let unreadable = value.as_ref().map_or(true, |v| depth(v) > MAX_BODY_DEPTH);
    let bad_user = req.user.len() > MAX_USER_LEN || req.user.chars().any(char::is_control);
    assert_eq!(checked.is_err(), unreadable || bad_user, "{checked:?}: {value:?}, user {:?}", req.user);
    if checked.is_err() {
        return;
    }

    let msg = PushMessage {
        seq: 7,
        ts_us: 1_800_000_000_000_000,
        kind: req.kind,
        user: req.user,
        body: req.body.get().to_owned(),
    };
    let batch = ServerMsg::Batch { room: "r".into(), messages: vec![msg.clone()], online: None };
    let mut json = Vec::new();
    encode_json(&batch, &mut json).expect("an accepted body encodes as JSON");
    assert_eq!(decode_json(&json).expect("decodes"), batch);
    let rkyv = encode_rkyv(&batch).expect("encodes as rkyv");
    assert_eq!(decode_rkyv(&rkyv).expect("decodes"), batch);
    let stored = store_encode_msg(&msg, Some("idem-1"));
    assert_eq!(store_decode_msg(7, &stored), Some((msg, Some("idem-1".into()))));
});
