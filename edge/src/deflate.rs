//! permessage-deflate on the send side: a room's batch is compressed once per (encoding, window
//! size) for the whole edge, by the first shard that has a member needing it, and the same
//! compressed frame is queued to every member that negotiated that window; and its counters.
//!
//! Why this keeps serialize-once: the edge always answers `server_no_context_takeover`, so a
//! compressed message depends on nothing but its bytes and the window: there is no
//! per-connection compression state, hence nothing per connection to compute. The work per
//! batch is one compression per window size in use (browsers all use the default 2^15), not one
//! per member.

use std::cell::RefCell;
use std::sync::Mutex;

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use roomcast_proto::deflate::{Compressor, MIN_COMPRESS};
use roomcast_proto::ws::{self, OpCode};

thread_local! {
    /// The thread's compressors (one per window size in use, about 256 KiB each at 2^15),
    /// reset before each message.
    static COMPRESSOR: RefCell<Compressor> = RefCell::new(Compressor::default());
}

/// A compressed frame (RSV1 set) carrying `payload` compressed with a 2^`bits` window. None when
/// it does not pay (small, or not smaller once compressed): the member gets the plain frame, which
/// RFC 7692 allows per message.
pub fn compress_payload(opcode: OpCode, payload: &[u8], bits: u8) -> Option<Bytes> {
    if payload.len() < MIN_COMPRESS {
        return None;
    }
    let mut z = Vec::new();
    let smaller = COMPRESSOR.with_borrow_mut(|c| c.compress(bits, payload, &mut z));
    smaller.then(|| Bytes::from(ws::encode_compressed_frame(opcode, &z)))
}

/// Like [`compress_payload`], for a complete (unmasked, unfragmented) server frame.
pub fn compress_frame(frame: &[u8], bits: u8) -> Option<Bytes> {
    let h = ws::parse_header(frame).ok()??;
    compress_payload(h.opcode, frame.get(h.header_len..)?, bits)
}

/// The compressed forms of one delivery's frames: made once for the edge, under a lock that only
/// the shards holding members of the room take, once per window size each.
#[derive(Default)]
pub struct Deflated {
    made: Mutex<Vec<Variant>>,
}

struct Variant {
    proto: usize,
    bits: u8,
    /// The batch's frame compressed (None: sent plain).
    frame: Option<Bytes>,
    /// Its must-deliver-only frame compressed (what a member that falls behind keeps).
    must: Option<Bytes>,
}

impl std::fmt::Debug for Deflated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.made.lock().map_or(0, |m| m.len());
        f.debug_struct("Deflated").field("variants", &n).finish()
    }
}

impl Deflated {
    /// The compressed frame and must-deliver frame for encoding `proto` and window `bits`:
    /// `make` runs only for the first caller (another shard asking meanwhile waits for it, then
    /// shares the result). The flag says whether this call made them (for the counter).
    pub fn get_or_make(
        &self,
        proto: usize,
        bits: u8,
        make: impl FnOnce() -> (Option<Bytes>, Option<Bytes>),
    ) -> (Option<Bytes>, Option<Bytes>, bool) {
        // A poisoned lock (a panic while compressing) only loses the cache: compress again.
        let mut made = self.made.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = made.iter().find(|v| v.proto == proto && v.bits == bits) {
            return (v.frame.clone(), v.must.clone(), false);
        }
        let (frame, must) = make();
        made.push(Variant { proto, bits, frame: frame.clone(), must: must.clone() });
        (frame, must, true)
    }
}

/// permessage-deflate's counters on /metrics (edge-wide, not per shard).
#[derive(Clone)]
pub struct DeflateStats {
    /// Connections that negotiated permessage-deflate.
    pub negotiated: IntCounter,
    /// Messages compressed (a shared batch counts once per window size, however many members
    /// get it).
    pub compressions: IntCounter,
    /// Bytes of compressed frames queued to members.
    pub bytes_compressed: IntCounter,
    /// Bytes the same frames would have been uncompressed.
    pub bytes_uncompressed: IntCounter,
}

impl DeflateStats {
    /// Registers the families in `reg`.
    ///
    /// # Panics
    ///
    /// If a family of the same name is registered already (a bug the unit tests catch).
    pub fn register(reg: &Registry) -> Self {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(Opts::new(name, help).namespace("roomcast")).expect("valid metric");
            reg.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let bytes = IntCounterVec::new(
            Opts::new(
                "ws_deflate_frame_bytes_total",
                "Frames queued to permessage-deflate members: form=compressed, their bytes as sent; \
                 form=uncompressed, what the same frames are without compression (plain frames sent \
                 to these members, where compression did not pay, count in both).",
            )
            .namespace("roomcast"),
            &["form"],
        )
        .expect("valid metric");
        reg.register(Box::new(bytes.clone())).expect("unique metric");
        Self {
            negotiated: counter(
                "ws_deflate_connections_total",
                "WebSocket connections that negotiated permessage-deflate.",
            ),
            compressions: counter(
                "ws_deflate_compressions_total",
                "Messages compressed for permessage-deflate members: a room batch counts once per window size, whatever the number of members it goes to.",
            ),
            bytes_compressed: bytes.with_label_values(&["compressed"]),
            bytes_uncompressed: bytes.with_label_values(&["uncompressed"]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_is_compressed_once_per_window() {
        let d = Deflated::default();
        let mut calls = 0;
        for _ in 0..3 {
            let (f, _, _) = d.get_or_make(0, 15, || {
                calls += 1;
                (Some(Bytes::from_static(b"z")), None)
            });
            assert_eq!(f.as_deref(), Some(&b"z"[..]));
        }
        d.get_or_make(0, 10, || {
            calls += 1;
            (None, None)
        });
        assert_eq!(calls, 2);
    }

    #[test]
    fn frames_compress_with_rsv1_and_small_ones_stay_plain() {
        let payload = "{\"seq\":1,\"kind\":\"gift\",\"body\":{\"rose\":3}},".repeat(20);
        let frame = ws::encode_frame(OpCode::Text, payload.as_bytes());
        let z = compress_frame(&frame, 15).unwrap();
        assert_eq!(z[0], 0xC1);
        assert!(z.len() * 3 < frame.len());
        assert!(compress_frame(&ws::encode_frame(OpCode::Text, b"{\"type\":\"pong\"}"), 15).is_none());
    }
}
