//! The store's records (`edge::store::db`, fjall values): what a restart reads back from disk,
//! where a torn or foreign value must be refused (the room is reported corrupt), never panic.
//!
//! Input: `mode` (mod 4), then bytes.
//! - 0: a `msgs` value (`seq`, 8 bytes, then the value): decoded, it encodes back to the
//!   same bytes (the format has one spelling per message).
//! - 1: a `meta` value: decoded, its 32 bytes encode back the same.
//! - 2: a room name and a seq: the message key holds the room then the seq, in order.
//! - 3: a message made from the bytes (kind, user, key and body as the edge bounds them):
//!   encoded then decoded, it is the same message and key.
#![no_main]

use edge::fuzzing::{
    store_decode_meta, store_decode_msg, store_encode_meta, store_encode_msg, store_msg_key, store_seq_of,
};
use libfuzzer_sys::fuzz_target;
use roomcast_proto::envelope::PushMessage;

/// Splits off a piece of at most `max` bytes, its length from the first byte.
fn piece<'a>(data: &mut &'a [u8], max: usize) -> &'a [u8] {
    let Some((&n, rest)) = data.split_first() else { return &[] };
    let n = (usize::from(n) % (max + 1)).min(rest.len());
    let (p, rest) = rest.split_at(n);
    *data = rest;
    p
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    match mode % 4 {
        0 => {
            let Some((seq, v)) = rest.split_first_chunk::<8>() else { return };
            let seq = u64::from_le_bytes(*seq);
            let Some((m, key)) = store_decode_msg(seq, v) else { return };
            assert_eq!(m.seq, seq);
            // Lengths over 15 bits cannot be written (the kind's top bit is a flag).
            if m.user.len() < 0x8000 && key.as_ref().is_none_or(|k| k.len() < 0x8000) {
                assert_eq!(store_encode_msg(&m, key.as_deref()), v, "{m:?} {key:?}");
            }
        }
        1 => {
            if let Some(meta) = store_decode_meta(rest) {
                assert_eq!(store_encode_meta(&meta), &rest[..32]);
            }
        }
        2 => {
            let Some((seq, room)) = rest.split_first_chunk::<8>() else { return };
            let seq = u64::from_be_bytes(*seq);
            let Ok(room) = std::str::from_utf8(room) else { return };
            let key = store_msg_key(room, seq);
            assert_eq!(store_seq_of(&key), Some(seq));
            assert_eq!(&key[..room.len()], room.as_bytes());
            assert_eq!(key[room.len()], 0);
        }
        _ => {
            let mut d = rest;
            let kind = String::from_utf8_lossy(piece(&mut d, 32)).into_owned();
            let user = String::from_utf8_lossy(piece(&mut d, 64)).into_owned();
            // An idempotency key when its length byte is even.
            let keyed = d.first().is_some_and(|b| b % 2 == 0);
            let key = piece(&mut d, 64);
            let key = keyed.then(|| String::from_utf8_lossy(key).into_owned());
            let body = String::from_utf8_lossy(d).into_owned();
            let m = PushMessage { seq: 3, ts_us: u64::from(mode.wrapping_mul(7)), kind, user, body };
            let v = store_encode_msg(&m, key.as_deref());
            assert_eq!(store_decode_msg(3, &v), Some((m, key.map(String::into_boxed_str))));
        }
    }
});
