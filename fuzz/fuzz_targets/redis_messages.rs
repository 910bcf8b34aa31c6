//! What the edge decodes from Redis: payloads on a room's channel and entries of its streams
//! (a message as the publish script wrote it, or a presence count), the moderation channel's
//! events, channel names, and `CLUSTER NODES` (the cluster bridge's view of the slots).
//!
//! Input: `mode` (mod 4), then the payload.
//!
//! Checks: no panic; a message read from Redis has a JSON body and travels in both envelope
//! encodings unchanged; writing a decoded message or event back in the same form reads back
//! the same; a channel name maps back to itself; every slot `CLUSTER NODES` assigns is served
//! by a primary that lists it.
#![no_main]

use edge::bus::slots::Topology;
use edge::fuzzing::{ModEvent, RoomPayload, moderation_event, room_of_channel, room_payload};
use libfuzzer_sys::fuzz_target;
use roomcast_proto::envelope::{ServerMsg, decode_json, decode_rkyv, encode_json, encode_rkyv};
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let [mode, payload @ ..] = data else { return };
    match mode % 4 {
        0 => match room_payload(payload) {
            RoomPayload::Message(msg, must_deliver, epoch) => {
                assert!(serde_json::from_str::<&RawValue>(&msg.body).is_ok(), "a body from Redis is JSON");
                // As the script writes it (its cjson escapes differently; any JSON reads the same).
                let text = |s: &str| serde_json::to_string(s).expect("a string serializes");
                let wire = format!(
                    r#"{{"ep":{epoch},"seq":{},"ts_us":{},"kind":{},"user":{},"md":{},"body":{}}}"#,
                    msg.seq,
                    msg.ts_us,
                    text(&msg.kind),
                    text(&msg.user),
                    u8::from(must_deliver),
                    msg.body
                );
                let again = room_payload(wire.as_bytes());
                assert_eq!(again, RoomPayload::Message(msg.clone(), must_deliver, epoch));
                let batch = ServerMsg::Batch { room: "r".into(), messages: vec![msg], online: None };
                let mut json = Vec::new();
                encode_json(&batch, &mut json).expect("a message from Redis encodes as JSON");
                assert_eq!(decode_json(&json).expect("decodes"), batch);
                assert_eq!(decode_rkyv(&encode_rkyv(&batch).expect("encodes")).expect("decodes"), batch);
            }
            RoomPayload::Online(n) => {
                assert_eq!(room_payload(format!("{{\"online\":{n}}}").as_bytes()), RoomPayload::Online(n));
            }
            RoomPayload::Unreadable => {}
        },
        1 => {
            if let Some(ev) = moderation_event(payload) {
                let text = serde_json::to_vec(&ev).expect("serializes");
                assert_eq!(moderation_event(&text), Some(ev.clone()));
                let _: &ModEvent = &ev;
            }
        }
        2 => {
            let Ok(channel) = std::str::from_utf8(payload) else { return };
            if let Some(room) = room_of_channel(channel) {
                assert_eq!(format!("rc:{{{room}}}:ch"), channel);
            }
            let made = format!("rc:{{{channel}}}:ch");
            assert_eq!(room_of_channel(&made), Some(channel));
        }
        _ => {
            let Ok(text) = std::str::from_utf8(payload) else { return };
            let Ok(t) = Topology::parse(text) else { return };
            assert!(!t.nodes.is_empty());
            for slot in 0..16384u16 {
                if let Some(node) = t.owner(slot) {
                    assert!(node.primary, "slot {slot} owned by a replica");
                    assert!(
                        node.slots.iter().any(|&(a, b)| a <= slot && slot <= b),
                        "slot {slot} not listed by its owner"
                    );
                }
            }
            let _ = t.covered();
        }
    }
});
