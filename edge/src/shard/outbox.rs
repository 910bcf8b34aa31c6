//! Sending: a connection's queue, bounded whatever the origin of a frame, and the one send
//! (`SEND` or `WRITEV`) in flight per connection.

use bytes::Bytes;
use roomcast_proto::envelope::{self, ServerMsg};
use roomcast_proto::ws::{self, OpCode};

use super::conn::{Closing, Conn, OutFrame};
use super::{Retry, SENDS_PER_TURN, Shard};
use crate::uring::{OpKind, Sq, Token};

impl Shard {
    pub(super) fn send_msg(&mut self, slot: u32, msg: &ServerMsg) {
        self.send_msg_at(slot, msg, None);
    }

    /// Like `send_msg`; an SSE connection's event also carries `id: EPOCH:SEQ` for `at`.
    pub(super) fn send_msg_at(&mut self, slot: u32, msg: &ServerMsg, at: Option<(crate::bus::Epoch, u64)>) {
        let Some(Some(c)) = self.conns.get(slot as usize) else { return };
        let proto = c.proto;
        match envelope::encode(proto, msg) {
            Ok(payload) => {
                let frame = if proto == roomcast_proto::Subprotocol::Sse {
                    crate::bus::frame_at(proto, &payload, at)
                } else {
                    let opcode = if proto.is_binary() { OpCode::Binary } else { OpCode::Text };
                    self.own_frame(slot, opcode, &payload)
                };
                self.push_frame(slot, frame);
            }
            Err(e) => tracing::error!(shard = self.id, error = %e, "cannot encode message"),
        }
    }

    /// A WebSocket frame of the connection's own (an answer, an error, an echo): compressed
    /// (with the thread's compressor: no per-connection state, as the edge never keeps context)
    /// when the connection negotiated permessage-deflate and it pays, else plain. Most of these
    /// are under `deflate::MIN_COMPRESS` bytes and go plain.
    pub(super) fn own_frame(&self, slot: u32, opcode: OpCode, payload: &[u8]) -> Bytes {
        let bits = match self.conns.get(slot as usize) {
            Some(Some(c)) => c.deflate_bits,
            _ => 0,
        };
        if bits != 0 {
            let plain_len = payload.len()
                + if payload.len() < 126 {
                    2
                } else if payload.len() <= 0xffff {
                    4
                } else {
                    10
                };
            let d = &self.stats.deflate;
            d.bytes_uncompressed.inc_by(plain_len as u64);
            if let Some(z) = crate::deflate::compress_payload(opcode, payload, bits) {
                d.compressions.inc();
                d.bytes_compressed.inc_by(z.len() as u64);
                return z;
            }
            d.bytes_compressed.inc_by(plain_len as u64);
        }
        Bytes::from(ws::encode_frame(opcode, payload))
    }

    pub(super) fn send_error(&mut self, slot: u32, code: &str, message: &str) {
        self.send_msg(slot, &ServerMsg::Error { code: code.into(), message: message.into() });
    }

    pub(super) fn send_control(&mut self, slot: u32, frame: Vec<u8>) {
        self.push_frame(slot, Bytes::from(frame));
    }

    /// Queues a frame of the connection's own (101 answer, pong, joined, published, error,
    /// replay...). It counts against `send.max_queue_bytes` / `max_queue_frames` like any
    /// delivery: a client that sends pings and never reads fills its own queue, is shed, and
    /// is closed as a slow consumer (4000) rather than growing the edge.
    pub(super) fn push_frame(&mut self, slot: u32, bytes: Bytes) {
        let (max_bytes, max_frames) = (self.cfg.send.max_queue_bytes, self.cfg.send.max_queue_frames);
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.closing != Closing::No {
            return;
        }
        let over = |c: &Conn| c.out_bytes + bytes.len() > max_bytes + c.replay_credit || c.out.len() >= max_frames;
        if over(c) {
            let shed = c.shed();
            self.stats.shed_bytes.inc_by(shed as u64);
            if over(c) {
                self.stats.slow_consumer_closes.inc();
                tracing::info!(
                    shard = self.id,
                    slot,
                    out_bytes = c.out_bytes,
                    frames = c.out.len(),
                    credit = c.replay_credit,
                    adding = bytes.len(),
                    "closing slow consumer (4000): its own frames over the queue bound"
                );
                c.drop_unsent(c.in_flight as usize);
                self.closing_for(slot, crate::metrics::CloseWhy::SlowConsumer);
                return self.close_with(slot, 4000, "slow consumer: reconnect with since");
            }
        }
        c.push(OutFrame::control(bytes));
        self.mark_dirty(slot);
    }

    pub(super) fn mark_dirty(&mut self, slot: u32) {
        if let Some(Some(c)) = self.conns.get_mut(slot as usize)
            && !c.dirty
            && c.in_flight == 0
        {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    pub(super) fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        let mut done = 0;
        for &slot in &dirty {
            if self.sends_this_turn >= SENDS_PER_TURN {
                break;
            }
            done += 1;
            if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                c.dirty = false;
                if c.in_flight == 0 && !c.out.is_empty() && c.closing != Closing::Abort {
                    self.issue_send(slot);
                }
            }
        }
        // What the budget left waits for the next turn, first in line.
        dirty.drain(..done);
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    pub(super) fn issue_send(&mut self, slot: u32) {
        let max_iov = self.cfg.send.max_iov;
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        debug_assert_eq!(c.in_flight, 0);
        // The peer's time to take these bytes starts now, not when it last took some: frames
        // that waited for this shard are the shard's delay, not the peer's (`is_idle`).
        c.last_tx_ms = now_ms;
        if c.tls.is_some() {
            return self.tls_issue_send(slot);
        }
        let tok = Token::new(OpKind::Send, c.generation, slot);
        let n = c.out.len().min(max_iov);
        let r = if n == 1 {
            let (ptr, len) = c.head_slice();
            // SAFETY: the frame is the front of `c.out` and stays there (not popped, not
            // mutated: `Bytes` is immutable) until `on_send` reaps this token's completion.
            unsafe { Sq::new(&mut self.ring).send(slot, ptr, len as u32, tok) }
        } else {
            c.fill_iov(n);
            // SAFETY: `c.iov` and the first `n` frames of `c.out` are left untouched while
            // `in_flight > 0`, i.e. until `on_send` reaps this token's completion.
            unsafe { Sq::new(&mut self.ring).writev(slot, c.iov.as_ptr(), n as u32, tok) }
        };
        match r {
            Ok(()) => {
                c.in_flight = n as u16;
                self.sends_this_turn += 1;
            }
            // The SQ is full and the kernel pushed back: the frames stay queued; next turn.
            Err(_) => self.retry.push((Retry::Send, slot)),
        }
    }
}
