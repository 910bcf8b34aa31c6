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
        self.mark_urgent(slot);
    }

    pub(super) fn mark_dirty(&mut self, slot: u32) {
        if let Some(Some(c)) = self.conns.get_mut(slot as usize)
            && !c.dirty
            && c.in_flight == 0
        {
            c.dirty = true;
            self.lines.deliveries.push(slot);
        }
    }

    /// Puts the connection in the answer line, ahead of the room deliveries: it has an answer of
    /// its own queued (a 101, `joined` and its replay, a pong, an error, a `goaway`). See
    /// [`SendLines`] for why.
    pub(super) fn mark_urgent(&mut self, slot: u32) {
        if let Some(Some(c)) = self.conns.get_mut(slot as usize)
            && !c.urgent
            && c.in_flight == 0
        {
            c.urgent = true;
            self.lines.answers.push(slot);
        }
    }

    /// Hands the kernel one send per waiting connection, up to `SENDS_PER_TURN`, in the order
    /// [`SendLines::turn`] gives. A connection in both lines is sent once (from the answer
    /// line); its delivery-line entry then finds the send in flight and passes.
    pub(super) fn flush_dirty(&mut self) {
        let mut lines = std::mem::take(&mut self.lines);
        lines.turn(|slot, line| {
            if self.sends_this_turn >= SENDS_PER_TURN {
                return false;
            }
            if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                match line {
                    Line::Answers => c.urgent = false,
                    Line::Deliveries => c.dirty = false,
                }
                if c.in_flight == 0 && !c.out.is_empty() && c.closing != Closing::Abort {
                    self.issue_send(slot);
                }
            }
            true
        });
        // Anything marked during the turn waits behind what the budget left, in its line.
        lines.append(&mut self.lines);
        self.lines = lines;
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

/// Which line a waiting connection is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Line {
    /// An answer of the connection's own is queued.
    Answers,
    /// Room deliveries are queued.
    Deliveries,
}

/// The connections waiting for a send, in two lines: answers of their own (a 101, `joined` and
/// its replay, a pong, an error, a `goaway`) ahead of room deliveries.
///
/// Why two: a shard fanning a gift out to its 16k members needs ~16 turns of `SENDS_PER_TURN`,
/// and on a busy box each turn can wait a scheduler round. With one line, a 101 queued behind
/// that fan-out reached a moving client after its 10 s upgrade timeout: in every 10^6 rolling
/// restart, once edge B held ~70% of the members, upgrades there timed out and the moves fell
/// behind the goaways. The answer line costs nothing per delivery, and what goes in it is
/// bounded by what the connection itself sends (signalling is rate-limited, pongs answer
/// pings, replays are bounded by the history limits).
#[derive(Default)]
pub(super) struct SendLines {
    pub answers: Vec<u32>,
    pub deliveries: Vec<u32>,
}

impl SendLines {
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty() && self.deliveries.is_empty()
    }

    /// One turn: offers `send` the answer line, then the delivery line, first come first
    /// served, until it declines one (the turn's budget is spent); the declined and the rest
    /// stay, first in their lines.
    pub fn turn(&mut self, mut send: impl FnMut(u32, Line) -> bool) {
        for (line, which) in [(&mut self.answers, Line::Answers), (&mut self.deliveries, Line::Deliveries)] {
            let done = line.iter().take_while(|&&slot| send(slot, which)).count();
            line.drain(..done);
            if !line.is_empty() {
                return;
            }
        }
    }

    /// Appends `later`'s lines behind these.
    pub fn append(&mut self, later: &mut SendLines) {
        self.answers.append(&mut later.answers);
        self.deliveries.append(&mut later.deliveries);
    }
}

#[cfg(test)]
mod tests {
    use super::{Line, SendLines};

    /// A turn that takes up to `budget` sends; what it took, in order.
    fn turn(lines: &mut SendLines, budget: usize) -> Vec<(u32, Line)> {
        let mut took = Vec::new();
        lines.turn(|slot, line| {
            if took.len() == budget {
                return false;
            }
            took.push((slot, line));
            true
        });
        took
    }

    #[test]
    fn an_answer_goes_ahead_of_a_fan_out_in_progress() {
        // A gift's fan-out to 3,000 members is queued; then a new connection's 101.
        let mut lines = SendLines { deliveries: (0..3000).collect(), answers: Vec::new() };
        let first = turn(&mut lines, 1024);
        assert_eq!(first.len(), 1024);
        assert!(first.iter().enumerate().all(|(i, &(s, l))| s == i as u32 && l == Line::Deliveries));
        lines.answers.push(5000);
        let second = turn(&mut lines, 1024);
        // The answer is the turn's first send, not the one after the remaining 1,976 deliveries.
        assert_eq!(second[0], (5000, Line::Answers));
        assert_eq!(second[1], (1024, Line::Deliveries));
        assert_eq!(second.len(), 1024);
        // The deliveries keep their order across turns, and all of them go.
        let rest: Vec<u32> = std::iter::from_fn(|| {
            let t = turn(&mut lines, 1024);
            (!t.is_empty()).then_some(t)
        })
        .flatten()
        .map(|(s, _)| s)
        .collect();
        assert_eq!(rest, (2047..3000).collect::<Vec<u32>>());
        assert!(lines.is_empty());
    }

    #[test]
    fn answers_over_the_budget_wait_first_in_their_line_and_hold_the_deliveries() {
        let mut lines = SendLines { answers: (0..5).collect(), deliveries: vec![100, 101] };
        assert_eq!(turn(&mut lines, 3), vec![(0, Line::Answers), (1, Line::Answers), (2, Line::Answers)]);
        // Marked during the turn: behind what the budget left.
        let mut later = SendLines { answers: vec![9], deliveries: vec![102] };
        lines.append(&mut later);
        assert_eq!(
            turn(&mut lines, 10),
            vec![
                (3, Line::Answers),
                (4, Line::Answers),
                (9, Line::Answers),
                (100, Line::Deliveries),
                (101, Line::Deliveries),
                (102, Line::Deliveries)
            ]
        );
        assert!(lines.is_empty());
    }
}
